"""A tampered journal never puts a wrong byte on stdout or in DEST.

Bytes are flipped, the way bit rot or a careless tool would, in records (a
chunk id inside a chunk-list edit, the size, the content hash), in a record
block (records compaction moved into the pack files) and in a pack entry (a
chunk value).  Then every read path runs: ``cat`` of every version, a tree
``restore --to DEST``, a restore in place into SRC, ``diff`` and ``mirror
sync``.  Each must give exactly the bytes of the version, or stop with exit
status 3 naming the file and the version; a tree restore writes everything
else and lists what failed.  A corruption that no read notices fails the
test too (each damage names the versions it must break).
"""

from __future__ import annotations

import json
import os
import random

import lmdb
import pytest

from deltafs import cli
from deltafs.journal import Change, Journal
from deltafs.journal import compact as JC
from deltafs.journal import schema as S

from test_history import Builder
from test_journal import corrupt_chunk

BIG = 120_000


@pytest.fixture
def hist(tmp_path):
    """SRC with a journal: d/a (5 versions, each an edit of the one before),
    d/b (2 versions), d/c (1); the files in SRC are the latest versions."""
    src = tmp_path / "src"
    src.mkdir()
    b = Builder(src / ".deltafs")
    rnd = random.Random(17)
    b.mkdir(b"d")
    files: dict[bytes, list[int]] = {b"d/a": [], b"d/b": [], b"d/c": []}
    data = bytearray(rnd.randbytes(BIG))
    for _ in range(5):
        pos = rnd.randrange(BIG - 100)
        data[pos:pos + 100] = rnd.randbytes(100)
        files[b"d/a"].append(b.write(b"d/a", bytes(data)))
    for _ in range(2):
        files[b"d/b"].append(b.write(b"d/b", rnd.randbytes(50_000)))
    files[b"d/c"].append(b.write(b"d/c", b"plain text\n" * 50))
    for i in range(30):  # enough records for a record block holding every version
        b.commit(Change(op="setattr", file_id=b.fid(b"d"), path=b"d", mode=0o40700 | i))
    for path, seqs in files.items():
        (src / os.fsdecode(path)).parent.mkdir(exist_ok=True)
        (src / os.fsdecode(path)).write_bytes(b.content[seqs[-1]])
    content = dict(b.content)
    b.close()
    return src, src / ".deltafs", files, content


def run(capsysbinary, *args) -> tuple[int, bytes, str]:
    rc = cli.main([os.fsdecode(a) if isinstance(a, bytes) else str(a) for a in args])
    out, err = capsysbinary.readouterr()
    return rc, out, err.decode()


def stored(jdir, seq: int) -> bytes:
    env = lmdb.open(str(jdir), max_dbs=S.MAX_DBS, map_size=1 << 40, readonly=True)
    with env.begin() as txn:
        v = bytes(txn.get(S.u64(seq), db=env.open_db(S.DB_CHANGES, txn=txn)))
    env.close()
    return v


def flip_in_record(jdir, seq: int, needle: bytes, at: int = 0) -> None:
    """Flip one byte of ``needle`` (found once) in the stored record ``seq``."""
    v = stored(jdir, seq)
    assert v.count(needle) == 1, (seq, needle)
    pos = v.index(needle) + at
    v = v[:pos] + bytes([v[pos] ^ 0x01]) + v[pos + 1:]
    env = lmdb.open(str(jdir), max_dbs=S.MAX_DBS, map_size=1 << 40)
    with env.begin(write=True) as txn:
        txn.put(S.u64(seq), v, db=env.open_db(S.DB_CHANGES, txn=txn))
    env.close()


def record_of(jdir, seq: int):
    with Journal.open(jdir, readonly=True) as j, j.reader() as r:
        return r.record(seq)


def damage(kind: str, jdir, files) -> set[int]:
    """Damage the journal; -> the versions every read of which must fail."""
    a, bv = files[b"d/a"], files[b"d/b"]
    if kind == "edit":  # a chunk id inside d/a's third edit: that version and the later ones still holding it
        rec = record_of(jdir, a[2])
        cid = rec.edit[0][2][0][0]
        with Journal.open(jdir, readonly=True) as j, j.reader() as r:
            broken = {s for s in a[2:] if cid in {c for c, _ in r.chunk_list(s)}}
        flip_in_record(jdir, a[2], cid, at=7)
        assert a[2] in broken
        return broken
    if kind == "size":
        rec = record_of(jdir, a[3])
        flip_in_record(jdir, a[3], b"\x0b\xce" + rec.size.to_bytes(4, "big"), at=5)
        return {a[3]}
    if kind == "hash":
        rec = record_of(jdir, bv[1])
        flip_in_record(jdir, bv[1], rec.content_hash, at=9)
        return {bv[1]}
    if kind == "chunk":  # a chunk of d/a's last version that the first one does not have
        with Journal.open(jdir, readonly=True) as j, j.reader() as r:
            first = {c for c, _ in r.chunk_list(a[0])}
            cid = next(c for c, _ in r.chunk_list(a[-1]) if c not in first)
            broken = {s for s in a if cid in {c for c, _ in r.chunk_list(s)}}
        corrupt_chunk(jdir, cid, at=-3)
        return broken
    if kind == "block":  # move the records into blocks, then flip a byte inside the first block
        with Journal.open(jdir) as j:
            assert j.archive_records(keep=1) >= JC.RECORD_BLOCK
            with j.reader() as r:
                pack, off, length, _ = S.decode_block_loc(r.txn.get(S.block_key(1), db=r.dbs[S.DB_RECORD_BLOCKS]))
        with open(jdir / "packs" / f"{pack:08x}.pack", "r+b") as f:
            f.seek(off + length // 2)
            byte = f.read(1)
            f.seek(off + length // 2)
            f.write(bytes([byte[0] ^ 0x01]))
        return set(a) | set(bv) | set(files[b"d/c"])  # every record is in that block or reads it
    raise AssertionError(kind)


def named(err: str, path: bytes, seq: int) -> bool:
    return err.count("\n") == 1 and os.fsdecode(path) in err and f"version {seq}" in err \
        and "Traceback" not in err


@pytest.mark.parametrize("kind", ["edit", "size", "hash", "chunk", "block"])
def test_no_wrong_byte_reaches_stdout_or_dest(hist, kind, capsysbinary, tmp_path):
    src, jdir, files, content = hist
    must_fail = damage(kind, jdir, files)

    # cat of every version: the exact bytes, or exit 3 naming file and version and
    # at most a prefix of the right bytes (chunks are checked before they are written)
    failed = set()
    for path, seqs in files.items():
        for seq in seqs:
            rc, out, err = run(capsysbinary, "cat", "--journal", jdir, path, "--version", seq)
            if rc == 0:
                assert out == content[seq], (kind, path, seq)
                continue
            failed.add(seq)
            assert rc == 3 and named(err, path, seq), (kind, rc, err)
            assert content[seq].startswith(out), (kind, path, seq)
            if kind != "chunk":  # a damaged list is caught before the first byte
                assert out == b""
    assert failed == must_fail, kind

    # a tree restore to DEST at the last damaged version: every file exact or absent,
    # the absent ones listed
    at = max(must_fail)
    want = {p: max(x for x in seqs if x <= at) for p, seqs in files.items() if seqs[0] <= at}
    dest = tmp_path / "dest"
    rc, out, err = run(capsysbinary, "restore", "--journal", jdir, "d", "--to", dest, "--version", at,
                       "--json")
    assert rc == 3, err
    if kind != "block":
        rep = json.loads(out)
        listed = {f["path"] for f in rep["failed"]}
        assert listed and all(f["corrupt"] for f in rep["failed"]) and rep["corrupt"]
        for path, seq in want.items():
            name = os.fsdecode(path)
            if seq in must_fail:
                assert name in listed and not (dest / name[2:]).exists()
                assert named([x for x in err.splitlines(True) if name in x][0], path, seq)
            else:
                assert (dest / name[2:]).read_bytes() == content[seq]
    else:  # the tree itself cannot be rebuilt: nothing is written
        assert named(err, b"d", at)
        assert not dest.exists() or not any(dest.rglob("*"))
    if dest.exists():
        assert not [p for p in dest.rglob("*") if p.name.startswith(".deltafs-restore")]

    # in place into SRC (not mounted): what SRC holds is never replaced by wrong bytes
    for path in files:
        (src / os.fsdecode(path)).write_bytes(b"changed since\n")
    rc, out, err = run(capsysbinary, "restore", src / "d", "--version", at)
    assert rc == 3, err
    for path in files:
        now = (src / os.fsdecode(path)).read_bytes()
        if path not in want or want[path] in must_fail or kind == "block":
            assert now == b"changed since\n", (kind, path)
        else:
            assert now == content[want[path]], (kind, path)

    # a sound version restores in place even when the latest one (which SRC is
    # compared with, to journal what changed outside deltafs first) is damaged
    a = files[b"d/a"]
    if kind != "block":
        path, seqs = next(((p, x) for p, x in files.items() if x[-1] in must_fail and x[0] not in must_fail),
                          (b"d/a", a))
        rc, out, err = run(capsysbinary, "restore", src / os.fsdecode(path), "--version", seqs[0])
        assert rc == 0, err
        assert (src / os.fsdecode(path)).read_bytes() == content[seqs[0]]

    # diff of d/a between its first and last versions: exact, or exit 3 with nothing printed
    rc, out, err = run(capsysbinary, "diff", "--journal", jdir, "d/a", a[0], a[-1], "--json")
    if a[0] in must_fail or a[-1] in must_fail:
        assert rc == 3 and out == b"" and "d/a" in err and err.count("\n") == 1, err
    else:
        assert rc == 0 and json.loads(out)["to"]["size"] == BIG

    # mirror sync ships nothing it cannot vouch for
    mirror = tmp_path / "mirror"
    rc, out, err = run(capsysbinary, "mirror", "sync", f"file://{mirror}", "--journal", jdir)
    assert rc == 3 and err.count("\n") == 1, err
    if kind != "block":
        bad = min(must_fail)
        assert f"version {bad}" in err or "version" in err
        manifest = mirror / "manifest.json"
        if manifest.exists():
            assert json.loads(manifest.read_text())["last_seq"] < bad


def test_a_chunk_header_that_lies_about_its_length_says_so(hist, capsysbinary):
    """The header's length is damaged, the chunk decodes to the length its
    list gives: the message says which two disagree (it once read
    "has length 11, expected 11")."""
    src, jdir, files, content = hist
    c = files[b"d/c"][0]
    with Journal.open(jdir, readonly=True) as j, j.reader() as r:
        (cid, n), = r.chunk_list(c)
    corrupt_chunk(jdir, cid, at=5)  # the low byte of the header's raw length
    rc, out, err = run(capsysbinary, "verify", "--journal", jdir, "--full")
    assert rc == 3
    assert f"chunk {cid.hex()} decompresses to {n} bytes but its header says {n ^ 0xFF}" in out.decode()
    rc, out, err = run(capsysbinary, "cat", "--journal", jdir, "d/c")
    assert rc == 3 and out == b"" and named(err, b"d/c", c) and cid.hex() in err


def test_clone_at_a_bad_when_is_refused_before_anything_is_downloaded(hist, capsysbinary, tmp_path):
    """Only the manifest (and the snapshots object, or the first segment for a
    time) is read: with the packs gone, a bad --at still gets its own message."""
    src, jdir, files, content = hist
    mirror = tmp_path / "mirror"
    assert run(capsysbinary, "mirror", "sync", f"file://{mirror}", "--journal", jdir)[0] == 0
    for p in (mirror / "packs").iterdir():
        p.unlink()
    cases = [("garbage", "is not a time, a version id or a known snapshot name"),
             ("99999", "unknown version 99999"),
             ("2001-01-01", "is before the first version"),
             ("2999-01-01", "is in the future"),
             ("2026-13-45", "cannot read WHEN")]
    for when, msg in cases:
        dest = tmp_path / "clone"
        rc, out, err = run(capsysbinary, "clone", f"file://{mirror}", dest, "--at", when)
        assert rc == 2 and msg in err and err.count("\n") == 1, (when, err)
        assert not dest.exists()
    # a WHEN that cannot be read is refused before the mirror is even opened
    rc, out, err = run(capsysbinary, "clone", f"file://{tmp_path / 'nowhere'}", tmp_path / "c2", "--at", "2026-13-45")
    assert rc == 2 and "cannot read WHEN" in err
    # what a good --at needs is there: the clone then fails on the missing packs, not on WHEN
    rc, out, err = run(capsysbinary, "clone", f"file://{mirror}", tmp_path / "c3", "--at", str(files[b"d/a"][0]))
    assert rc == 5 and "missing" in err
