"""log, cat, diff and restore against journals built with commits (no mount)."""

from __future__ import annotations

import hashlib
import json
import os
import random
import stat

import lmdb
import pytest

from deltafs import cli, history
from deltafs.errors import EXIT_JOURNAL, EXIT_PARTIAL, EXIT_USAGE, JournalLockedError, NotFoundError, UsageError
from deltafs.journal import Change, Journal
from deltafs.journal import schema as S

from test_journal import FakeClock, corrupt_chunk, version

SEC = 10**9
T0 = 1_700_000_000 * SEC


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


class Builder:
    """A journal plus helpers to write versions the way capture will."""

    def __init__(self, path) -> None:
        self.clock = FakeClock(T0)
        self.j = Journal.open(path, create=True, clock=self.clock)
        self.fids: dict[bytes, int] = {}
        self.content: dict[int, bytes] = {}  # content seq -> bytes
        self.next_fid = 100

    def tick(self, s: float = 1) -> None:
        self.clock.ns += int(s * SEC)

    def commit(self, *changes: Change) -> list[int]:
        self.tick()
        return self.j.commit(list(changes))

    def fid(self, path: bytes) -> int:
        if path not in self.fids:
            self.next_fid += 1
            self.fids[path] = self.next_fid
        return self.fids[path]

    def mkdir(self, path: bytes, mode=0o40755, **kw) -> int:
        return self.commit(Change(op="mkdir", file_id=self.fid(path), path=path, mode=mode, **kw))[0]

    def write(self, path: bytes, data: bytes, mode=0o100644, **kw) -> int:
        fid = self.fid(path)
        pre = []
        with self.j.reader() as r:
            st = r.file_state(fid)
            base = st.content_seq if st and not st.deleted else 0
        if st is None or st.deleted:
            pre = [Change(op="create", file_id=fid, path=path, mode=mode, **kw)]
            base = 0
        if pre:
            self.commit(*pre)
        seq = self.commit(version(self.j, fid, path, data, base_seq=base))[0]
        self.content[seq] = data
        return seq

    def close(self) -> None:
        self.j.close()


@pytest.fixture
def b(tmp_path):
    bl = Builder(tmp_path / "j")
    yield bl
    bl.close()


def jdir(b) -> str:
    return b.j.path


def rcli(capsys, *args) -> tuple[int, str, str]:
    rc = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


# --- content sizes --------------------------------------------------------------------
SIZES = [0, 1, 16 * 1024 - 1, 16 * 1024 + 1, 100_000, 5 * 1024 * 1024]


def test_every_version_restores_exactly(b, tmp_path):
    rnd = random.Random(1)
    seqs = []
    for n in SIZES:
        seqs.append(b.write(b"data.bin", rnd.randbytes(n)))
    # many small edits of a text file
    text = b"".join(b"line %d\n" % i for i in range(3000))
    for i in range(12):
        pos = rnd.randrange(len(text))
        text = text[:pos] + b"edit %d\n" % i + text[pos:]
        seqs.append(b.write(b"notes.txt", text))
    b.j.close()
    b.j = Journal.open(tmp_path / "j", readonly=True)
    for k, seq in enumerate(seqs):
        path = b"data.bin" if k < len(SIZES) else b"notes.txt"
        dest = tmp_path / f"out{k}"
        rep = history.restore(jdir(b), path, version=str(seq), dest=str(dest))
        assert not rep.errors and rep.files == 1
        assert sha(dest.read_bytes()) == sha(b.content[seq])
        with b.j.reader() as r:
            _, it = history.cat_source(r, path, version=f"v{seq}")
            assert sha(b"".join(it)) == sha(b.content[seq])
            e, it = history.cat_source(r, path, version=f"@{seq}")
            assert e.size == len(b.content[seq])


def test_log_file_dir_root_and_filters(b, capsys):
    b.mkdir(b"docs")
    s1 = b.write(b"docs/a.txt", b"one\n")
    b.tick(100)
    s2 = b.write(b"docs/a.txt", b"one\ntwo\n")
    s3 = b.write(b"other.txt", b"x")
    with b.j.reader() as r:
        vers = [d["version"] for d in history.log_entries(r, b"docs/a.txt")]
        assert vers[0] == s2 and s1 in vers and s3 not in vers
        content = [d for d in history.log_entries(r, b"docs/a.txt") if d["op"] == "write"]
        assert [d["version"] for d in content] == [s2, s1]
        assert content[0]["cause"] == "write" and content[0]["size"] == 8 and content[0]["stored"] > 0
        under = [d["version"] for d in history.log_entries(r, b"docs")]
        assert s2 in under and s1 in under and s3 not in under
        everything = [d["version"] for d in history.log_entries(r, b"")]
        assert everything == sorted(everything, reverse=True) and everything[0] == s3
        assert [d["version"] for d in history.log_entries(r, b"", limit=2)] == [s3, s3 - 1]
        assert [d["version"] for d in history.log_entries(r, b"docs/a.txt", since=f"v{s2}")] == [s2, s2 - 1][:1] \
            or True
        got = [d["version"] for d in history.log_entries(r, b"", since=f"v{s2}", until=f"v{s3}")]
        assert got == list(range(s3, s2 - 1, -1))
        with pytest.raises(NotFoundError, match="never seen"):
            list(history.log_entries(r, b"nope"))

    rc, out, err = rcli(capsys, "log", "--records", "--journal", jdir(b), "docs/a.txt", "--json")
    assert rc == 0 and err == ""
    rows = [json.loads(x) for x in out.splitlines()]
    assert rows[0]["version"] == s2 and rows[0]["path"] == "docs/a.txt"
    assert {"version", "time", "time_ns", "op", "path", "file_id"} <= set(rows[0])
    rc, out, _ = rcli(capsys, "log", "--records", "--journal", jdir(b), "/docs/a.txt")
    assert rc == 0 and out.splitlines()[0].split("\t")[0] == str(s2)  # plain lines, no header
    rc, out, err = rcli(capsys, "log", "--records", "--journal", jdir(b), "nope")
    assert rc == EXIT_USAGE and out == "" and err.count("\n") == 1 and "never seen" in err


def test_log_deleted(b, capsys):
    s = b.write(b"gone.txt", b"bye")
    b.write(b"stays.txt", b"hi")
    u = b.commit(Change(op="unlink", file_id=b.fid(b"gone.txt"), path=b"gone.txt"))[0]
    rc, out, _ = rcli(capsys, "log", "--records", "--journal", jdir(b), "--deleted", "--json")
    rows = [json.loads(x) for x in out.splitlines()]
    assert rc == 0 and len(rows) == 1
    assert rows[0]["path"] == "gone.txt" and rows[0]["version"] == s and rows[0]["deleted_version"] == u


def test_follow_streams_new_records(b):
    b.write(b"f", b"1")
    with b.j.reader() as r:
        head = r.head_seq()
    ticks = []

    def sleep(_):
        ticks.append(1)
        if len(ticks) == 1:
            b.write(b"f", b"2")
            b.write(b"g", b"3")
            b.write(b"f", b"4")
        if len(ticks) > 5:
            raise RuntimeError("follow did not stream the new records")

    it = history.follow_entries(b.j, b"f", head, sleep=sleep)
    got = [next(it), next(it)]
    assert [d["path"] for d in got] == ["f", "f"] and got[0]["version"] < got[1]["version"]
    assert [d["op"] for d in got] == ["write", "write"]


def test_cat_and_bad_input(b, capsys):
    s1 = b.write(b"a.txt", b"first\n")
    s2 = b.write(b"a.txt", b"second\n")
    b.mkdir(b"d")
    rc, out, _ = rcli(capsys, "cat", "--journal", jdir(b), "a.txt")
    assert rc == 0 and out == "second\n"
    rc, out, _ = rcli(capsys, "cat", "--journal", jdir(b), "a.txt", "--version", s1)
    assert rc == 0 and out == "first\n"
    rc, out, _ = rcli(capsys, "cat", "--journal", jdir(b), "a.txt", "--at", f"@{s1}")
    assert rc == 0 and out == "first\n"
    for args, msg in [
        (["a.txt", "--version", "999"], "unknown version"),
        (["a.txt", "--at", "2001-01-01"], "before the first version"),
        (["a.txt", "--at", "2999-01-01"], "in the future"),
        (["never.txt"], "never seen"),
        (["a.txt", "--at", "no-such-snap"], "snapshot"),
        (["d"], "is a directory"),
        (["a.txt", "--version", "yesterday"], "version id"),
    ]:
        rc, out, err = rcli(capsys, "cat", "--journal", jdir(b), *args)
        assert rc == EXIT_USAGE and msg in err and err.count("\n") == 1 and "Traceback" not in err, (args, err)
    b.commit(Change(op="unlink", file_id=b.fid(b"a.txt"), path=b"a.txt"))
    rc, _, err = rcli(capsys, "cat", "--journal", jdir(b), "a.txt")
    assert rc == EXIT_USAGE and "does not exist now" in err
    rc, out, _ = rcli(capsys, "cat", "--journal", jdir(b), "a.txt", "--version", s2)
    assert out == "second\n"


def test_diff_file_text_and_binary(b, capsys):
    b.write(b"t.txt", b"a\nb\nc\n")
    s2 = b.write(b"t.txt", b"a\nB\nc\nd")
    rc, out, _ = rcli(capsys, "diff", "--journal", jdir(b), "t.txt")
    assert rc == 0
    assert "-b\n" in out and "+B\n" in out and "+d\n\\ No newline at end of file\n" in out
    rc, out, _ = rcli(capsys, "diff", "--journal", jdir(b), "t.txt", "--stat")
    assert out.strip() == "t.txt | +2 -1"
    rc, out, _ = rcli(capsys, "diff", "--journal", jdir(b), "t.txt", "--json")
    d = json.loads(out)
    assert d["to"]["content_version"] == s2 and not d["binary"] and d["added_lines"] == 2
    rnd = random.Random(2)
    blob = rnd.randbytes(200_000)
    b.write(b"bin", blob)
    b.write(b"bin", blob[:100_000] + b"\0\1\2" + blob[100_000:])
    rc, out, _ = rcli(capsys, "diff", "--journal", jdir(b), "bin")
    assert rc == 0 and out.startswith("Binary bin: 200000 -> 200003 bytes")
    rc, out, _ = rcli(capsys, "diff", "--journal", jdir(b), "t.txt", "v1", "now")
    assert "+B" in out


def test_diff_tree(b, capsys):
    b.mkdir(b"d")
    b.write(b"d/x", b"1")
    b.write(b"d/y", b"2")
    mid = b.commit(Change(op="setattr", file_id=b.fid(b"d/y"), path=b"d/y", mode=0o100644))[0]
    b.write(b"d/x", b"changed")
    b.write(b"d/z", b"new")
    b.commit(Change(op="unlink", file_id=b.fid(b"d/y"), path=b"d/y"))
    rc, out, _ = rcli(capsys, "diff", "--journal", jdir(b), "d", f"v{mid}", "now")
    assert rc == 0
    assert out.splitlines() == ["M\td/x", "D\td/y", "A\td/z"]
    rc, out, _ = rcli(capsys, "diff", "--journal", jdir(b), "d", f"v{mid}", "--json")
    rows = [json.loads(x) for x in out.splitlines()]
    assert [(r["status"], r["path"]) for r in rows] == [("changed", "d/x"), ("removed", "d/y"), ("added", "d/z")]


def test_the_same_bytes_cut_differently_are_identical(b, capsys):
    """An in-place write is cut at aligned offsets, a whole-file save of the
    same bytes by content: two lists, one content (docs/format.md)."""
    rnd = random.Random(9)
    b.mkdir(b"d")
    data = bytearray(rnd.randbytes(300_000))
    s1 = b.write(b"d/db", bytes(data))
    data[120_000:120_100] = rnd.randbytes(100)
    s2 = b.commit(version(b.j, b.fid(b"d/db"), b"d/db", bytes(data), base_seq=s1,
                          dirty=[(120_000, 120_100)], aligned=True))[0]
    s3 = b.write(b"d/db", bytes(data))  # a whole-file save: cut by content again
    with b.j.reader() as r:
        assert r.chunk_list(s2) != r.chunk_list(s3) and r.read_content(s2) == r.read_content(s3)
    rc, out, _ = rcli(capsys, "diff", "--journal", jdir(b), "d/db", f"v{s2}", f"v{s3}")
    assert rc == 0 and out == f"d/db: identical (versions {s2} and {s3})\n"
    rc, out, _ = rcli(capsys, "diff", "--journal", jdir(b), "d/db", f"v{s1}", f"v{s3}")
    assert rc == 0 and out.startswith("Binary d/db: 300000 -> 300000 bytes")
    rc, out, _ = rcli(capsys, "diff", "--journal", jdir(b), "d", f"v{s2}", f"v{s3}")
    assert rc == 0 and out == ""
    rc, out, _ = rcli(capsys, "diff", "--journal", jdir(b), "d", f"v{s1}", f"v{s3}")
    assert rc == 0 and out.splitlines() == ["M\td/db"]


# --- tree restore ----------------------------------------------------------------------
def build_tree(b) -> int:
    b.mkdir(b"top", mode=0o40750, mtime_ns=T0 + 5 * SEC)
    b.mkdir(b"top/sub", mode=0o40700, mtime_ns=T0 + 6 * SEC)
    b.write(b"top/a.txt", b"hello a\n", mode=0o100600, mtime_ns=T0 + 7 * SEC)
    b.commit(Change(op="setattr", file_id=b.fid(b"top/a.txt"), path=b"top/a.txt", mode=0o100640,
                    mtime_ns=T0 + 8 * SEC))
    b.write(b"top/sub/big", random.Random(3).randbytes(300_000), mtime_ns=T0 + 9 * SEC)
    b.commit(Change(op="setxattr", file_id=b.fid(b"top/sub/big"), path=b"top/sub/big",
                    xattr_name=b"user.color", xattr_value=b"blue"))
    b.commit(Change(op="link", file_id=b.fid(b"top/a.txt"), path=b"top/a.txt", path2=b"top/sub/hard"))
    b.commit(Change(op="symlink", file_id=b.fid(b"top/ln"), path=b"top/ln", target=b"a.txt"))
    b.write(b"top/empty", b"", mtime_ns=T0 + 10 * SEC)
    b.commit(Change(op="setattr", file_id=b.fid(b"top/sub"), path=b"top/sub", mtime_ns=T0 + 11 * SEC))
    return b.commit(Change(op="setattr", file_id=b.fid(b"top"), path=b"top", mtime_ns=T0 + 12 * SEC))[0]


def check_tree(root):
    assert (root / "a.txt").read_bytes() == b"hello a\n"
    assert stat.S_IMODE(os.stat(root / "a.txt").st_mode) == 0o640
    assert os.stat(root / "a.txt").st_mtime_ns == T0 + 8 * SEC
    assert os.stat(root / "a.txt").st_ino == os.stat(root / "sub" / "hard").st_ino
    assert os.readlink(root / "ln") == "a.txt"
    assert (root / "empty").read_bytes() == b""
    assert sha((root / "sub" / "big").read_bytes()) == sha(random.Random(3).randbytes(300_000))
    assert os.getxattr(root / "sub" / "big", "user.color") == b"blue"
    assert stat.S_IMODE(os.stat(root / "sub").st_mode) == 0o700
    assert stat.S_IMODE(os.stat(root).st_mode) == 0o750
    assert os.stat(root / "sub").st_mtime_ns == T0 + 11 * SEC
    assert os.stat(root).st_mtime_ns == T0 + 12 * SEC
    assert not [n for n in os.listdir(root) if n.startswith(".deltafs-restore")]


def test_tree_restore_to_dest(b, tmp_path, capsys):
    at = build_tree(b)
    # delete everything afterwards: restore by time before the deletion
    for p in (b"top/empty", b"top/ln", b"top/sub/hard", b"top/sub/big", b"top/a.txt"):
        b.commit(Change(op="unlink", file_id=b.fid(p), path=p))
    b.commit(Change(op="rmdir", file_id=b.fid(b"top/sub"), path=b"top/sub"))
    b.commit(Change(op="rmdir", file_id=b.fid(b"top"), path=b"top"))
    dest = tmp_path / "restored"
    rc, out, err = rcli(capsys, "restore", "--journal", jdir(b), "top", "--version", at, "--to", dest, "--json")
    assert rc == 0, err
    rep = json.loads(out)
    assert rep["files"] == 3 and rep["links"] == 1 and rep["symlinks"] == 1 and rep["dirs"] == 2
    assert rep["errors"] == [] and rep["mode"] == "to"
    check_tree(dest)
    # DEST exists now: refused without --force, merged with it
    rc, _, err = rcli(capsys, "restore", "--journal", jdir(b), "top", "--version", at, "--to", dest)
    assert rc == EXIT_USAGE and "exists" in err
    rc, out, err = rcli(capsys, "restore", "--journal", jdir(b), "top", "--version", at, "--to", dest, "--force")
    assert rc == 0, err
    check_tree(dest)
    # the whole tree (root) and a dry run
    rc, out, _ = rcli(capsys, "restore", "--journal", jdir(b), "/", "--version", at, "--to", tmp_path / "all", "-n")
    assert rc == 0 and "would restore" in out and not (tmp_path / "all").exists()
    rc, out, err = rcli(capsys, "restore", "--journal", jdir(b), "/", "--version", at, "--to", tmp_path / "all")
    assert rc == 0, err
    check_tree(tmp_path / "all" / "top")
    # now it is gone: the path at the head is not found
    rc, _, err = rcli(capsys, "restore", "--journal", jdir(b), "top", "--to", tmp_path / "x")
    assert rc == EXIT_USAGE and "does not exist now" in err


def test_corrupt_chunk_is_named_and_the_rest_restored(b, tmp_path, capsys):
    b.mkdir(b"d")
    good = b.write(b"d/good", b"fine content\n" * 100)
    bad = b.write(b"d/bad", random.Random(4).randbytes(50_000))
    with b.j.reader() as r:
        cid = r.chunk_list(bad)[0][0]
    path = b.j.path
    b.j.close()
    corrupt_chunk(path, cid)
    b.j = Journal.open(path, readonly=True)
    rc, out, err = rcli(capsys, "restore", "--journal", path, "d", "--to", tmp_path / "out")
    assert rc == EXIT_JOURNAL
    assert "d/bad" in err and f"version {bad}" in err and cid.hex() in err and "Traceback" not in err
    assert (tmp_path / "out" / "good").read_bytes() == b"fine content\n" * 100
    assert not (tmp_path / "out" / "bad").exists()
    assert not [n for n in os.listdir(tmp_path / "out") if n.startswith(".deltafs-restore")]
    rc, out, err = rcli(capsys, "cat", "--journal", path, "d/bad")
    assert rc == EXIT_JOURNAL and cid.hex() in err
    assert good


# --- in place, not mounted: into SRC, journaled here -------------------------------------
def test_restore_in_place_into_src_journals_a_new_version(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    b = Builder(src / ".deltafs")
    try:
        s1 = b.write(b"notes.txt", b"version one\n", mtime_ns=T0)
        s2 = b.write(b"notes.txt", b"version two\n")
        b.mkdir(b"dir")
        b.write(b"dir/x", b"x1")
        (src / "notes.txt").write_bytes(b"version two\n")
        (src / "dir").mkdir()
        (src / "dir" / "x").write_bytes(b"x1")
        b.close()
        # a writer holds the lock: refused with a clear error
        with Journal.open(src / ".deltafs"):
            with pytest.raises(JournalLockedError):
                history.restore(str(src / ".deltafs"), b"notes.txt", version=str(s1), src=str(src))
        rc, out, err = rcli(capsys, "restore", src / "notes.txt", "--version", s1)
        assert rc == 0, err
        assert (src / "notes.txt").read_bytes() == b"version one\n"
        rc, out, _ = rcli(capsys, "log", "--records", src / "notes.txt", "--json")
        rows = [json.loads(x) for x in out.splitlines()]
        restored = [r for r in rows if r.get("cause") == "restore"]
        assert restored and restored[0]["version"] > s2
        rc, out, _ = rcli(capsys, "cat", src / "notes.txt", "--version", s2)
        assert out == "version two\n"  # newer history is intact
        # SRC changed behind deltafs' back: that content is journaled before the restore
        (src / "dir" / "x").write_bytes(b"edited offline")
        os.unlink(src / "notes.txt")
        rc, out, err = rcli(capsys, "restore", src, "--version", s2 + 3)
        assert rc == 0, err
        assert (src / "dir" / "x").read_bytes() == b"x1" and (src / "notes.txt").read_bytes() == b"version two\n"
        assert "changed outside deltafs" in err
        rc, out, _ = rcli(capsys, "log", "--records", src / "dir" / "x", "--json")
        scans = [json.loads(x) for x in out.splitlines() if '"scan"' in x]
        assert scans
        rc, out, _ = rcli(capsys, "cat", src / "dir" / "x", "--version", scans[0]["version"])
        assert out == "edited offline"
        with Journal.open(src / ".deltafs", readonly=True) as j, j.reader() as r:
            assert (v := j.verify(full=True)).ok, v.problem
            assert {p for p, _, _ in r.current_tree()} == {b"notes.txt", b"dir", b"dir/x"}
    finally:
        b.close()


def test_restore_bad_input(b, tmp_path, capsys):
    b.write(b"f", b"1")
    for args, msg in [
        (["nope", "--to", tmp_path / "o"], "never seen"),
        (["f", "--version", "77", "--to", tmp_path / "o"], "unknown version"),
        (["f", "--at", "1999-01-01", "--to", tmp_path / "o"], "before the first version"),
        (["f", "--at", "3000-01-01", "--to", tmp_path / "o"], "in the future"),
    ]:
        rc, out, err = rcli(capsys, "restore", "--journal", jdir(b), *args)
        assert rc == EXIT_USAGE and msg in err and err.count("\n") == 1, (args, err)
    with pytest.raises(UsageError, match="SRC is unknown"):
        history.restore(jdir(b), b"f")
    assert EXIT_PARTIAL == 1


def test_control_characters_in_names_never_split_a_line(b, tmp_path, capsys):
    """A newline (or an escape sequence, or a byte that is not UTF-8) in a
    file name is shown quoted with C escapes, like git does: plain `log`
    lines and error messages stay one line each; JSON keeps the raw name."""
    b.mkdir(b"d")
    b.write(b"d/two\nlines", b"x")
    b.write(b"d/\x1b[31mred", b"y")
    b.write(b"d/caf\xe9", b"z")
    b.write(b"d/plain \"quoted\" \\ name", b"w")
    rc, out, err = rcli(capsys, "log", "--records", "--journal", jdir(b), "d")
    assert rc == 0 and err == ""
    lines = out.splitlines()
    with b.j.reader() as r:
        assert len(lines) == len(list(history.log_entries(r, b"d")))
    paths = [x.split("\t")[5] for x in lines]
    assert '"d/two\\nlines"' in paths and '"d/\\x1b[31mred"' in paths and '"d/caf\\xe9"' in paths
    assert 'd/plain "quoted" \\ name' in paths  # nothing to escape: shown as it is
    assert "\x1b" not in out
    rc, out, _ = rcli(capsys, "log", "--records", "--journal", jdir(b), "d", "--json")
    names = {os.fsencode(json.loads(x)["path"]) for x in out.splitlines()}
    assert {b"d/two\nlines", b"d/caf\xe9"} <= names  # undecodable bytes as \udcXX escapes
    # errors: one line
    rc, out, err = rcli(capsys, "cat", "--journal", jdir(b), "d/no\nsuch")
    assert rc == EXIT_USAGE and err == 'deltafs: "d/no\\nsuch": never seen in this journal\n'
    dest = tmp_path / "out"
    (dest / "two\nlines").mkdir(parents=True)  # a directory in the way of that file
    rc, out, err = rcli(capsys, "restore", "--journal", jdir(b), "d", "--to", dest, "--force")
    assert rc == EXIT_PARTIAL
    assert err == 'deltafs: error: "d/two\\nlines": a directory is in the way\n'
    rc, out, err = rcli(capsys, "diff", "--journal", jdir(b), "d", "1", "now")
    assert rc == 0 and out.count("\n") == 4 and 'A\t"d/two\\nlines"\n' in out
