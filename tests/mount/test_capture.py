"""Every save through the mount becomes the expected versions in the journal.

The journal is read after a clean unmount (which drains every pending
capture), with a read-only Journal in this process, the way `deltafs log`
reads it: no counters of the daemon are trusted.
"""

import json
import os
import random
import signal
import sqlite3
import subprocess
from pathlib import Path

import pytest

from deltafs import chunking
from deltafs.journal import Journal
from fusetools import run_cli

pytestmark = pytest.mark.timeout(120)


def content_versions(journal_dir, path: str):
    """(seq, cause, file_id, content bytes) of every content version recorded at path, oldest first."""
    with Journal.open(str(journal_dir), readonly=True) as j, j.reader() as r:
        out = []
        for rec in r.records():
            if rec.op == "write" and rec.path == path.encode():
                out.append((rec.seq, rec.cause, rec.file_id, r.read_content(rec.seq)))
        return out


def all_records(journal_dir):
    with Journal.open(str(journal_dir), readonly=True) as j, j.reader() as r:
        return list(r.records())


def journal_bytes(journal_dir) -> int:
    st = os.stat(os.path.join(journal_dir, "data.mdb"))
    return st.st_blocks * 512


def save(path, data: bytes) -> None:
    """A plain in-place save: truncate, write, fsync, close."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def test_each_plain_save_is_one_version(mounted):
    p = mounted.mnt / "todo.md"
    for i in range(3):
        save(p, f"version {i}\n".encode())
    mounted.umount()
    vs = content_versions(mounted.journal, "todo.md")
    assert [v[3] for v in vs] == [b"version 0\n", b"version 1\n", b"version 2\n"]
    assert len({v[2] for v in vs}) == 1  # one file identity


def test_atomic_rename_save_is_next_version_of_target(mounted):
    p = mounted.mnt / "doc.txt"
    save(p, b"first\n")
    for name in (".doc.txt.swp", "doc.txt.tmp", ".goutputstream-ABC123", "doc.txt.new"):
        tmp = mounted.mnt / name
        save(tmp, f"saved via {name}\n".encode())
        os.rename(tmp, p)
    mounted.umount()
    vs = content_versions(mounted.journal, "doc.txt")
    assert [v[3] for v in vs] == [b"first\n", b"saved via .doc.txt.swp\n", b"saved via doc.txt.tmp\n",
                                  b"saved via .goutputstream-ABC123\n", b"saved via doc.txt.new\n"]
    assert len({v[2] for v in vs}) == 1
    assert all(v[1] == "rename-over" for v in vs[1:])
    paths = {r.path for r in all_records(mounted.journal)} | {r.path2 for r in all_records(mounted.journal)}
    assert not any(p and (p.endswith(b".swp") or p.endswith(b".tmp") or b"goutputstream" in p)
                   for p in paths), "ignored temp files must not be journaled"


def test_vim_backup_rename_save(mounted):
    """vim with backupcopy=no: 4913 probe, rename to file~, write new file, delete file~."""
    p = mounted.mnt / "notes.txt"
    save(p, b"old text\n")
    probe = mounted.mnt / "4913"
    probe.write_bytes(b"")
    os.unlink(probe)
    os.rename(p, mounted.mnt / "notes.txt~")
    save(p, b"new text\n")
    os.chmod(p, 0o644)
    os.unlink(mounted.mnt / "notes.txt~")
    mounted.umount()
    vs = content_versions(mounted.journal, "notes.txt")
    assert [v[3] for v in vs] == [b"old text\n", b"new text\n"]
    assert len({v[2] for v in vs}) == 1, "the save continues the history of notes.txt"
    names = {r.path for r in all_records(mounted.journal)}
    assert b"4913" not in names and b"notes.txt~" not in names


def test_emacs_style_save(mounted):
    p = mounted.mnt / "e.org"
    save(p, b"* one\n")
    os.symlink("user@host.1234:1", mounted.mnt / ".#e.org")  # emacs lock link
    save(mounted.mnt / "#e.org#", b"* autosave\n")
    os.rename(p, mounted.mnt / "e.org~")  # backup by rename
    save(p, b"* two\n")
    os.unlink(mounted.mnt / "#e.org#")
    os.unlink(mounted.mnt / ".#e.org")
    mounted.umount()
    vs = content_versions(mounted.journal, "e.org")
    assert [v[3] for v in vs] == [b"* one\n", b"* two\n"]
    assert len({v[2] for v in vs}) == 1


def test_write_new_then_delete_old(mounted):
    p = mounted.mnt / "data.json"
    save(p, b'{"a": 1}\n')
    save(mounted.mnt / "data.json.new", b'{"a": 2}\n')
    os.unlink(p)
    os.rename(mounted.mnt / "data.json.new", p)
    mounted.umount()
    vs = content_versions(mounted.journal, "data.json")
    assert [v[3] for v in vs] == [b'{"a": 1}\n', b'{"a": 2}\n']
    assert len({v[2] for v in vs}) == 1


def test_one_line_edit_in_10mib_text_costs_one_chunk(mounted):
    lines = [f"line {i:07d}: the quick brown fox jumps over the lazy dog {i * 7919 % 10007}\n"
             for i in range(170_000)]
    text = "".join(lines).encode()
    assert len(text) > 10 << 20
    p = mounted.mnt / "big.txt"
    save(p, text)
    before = journal_bytes(mounted.journal)
    lines[85_000] = "an edited line in the middle of the file\n"
    save(p, "".join(lines).encode())  # an editor rewrites the whole file
    after = journal_bytes(mounted.journal)
    mounted.umount()
    assert after - before < 64 << 10, f"journal grew by {after - before} bytes"
    vs = content_versions(mounted.journal, "big.txt")
    assert vs[-1][3] == "".join(lines).encode()


def test_appends_cost_about_what_was_appended(mounted):
    p = mounted.mnt / "app.log"
    save(p, os.urandom(4 << 20))
    with Journal.open(str(mounted.journal), readonly=True) as j, j.reader() as r:
        stored0 = r.stats()["stored_bytes"]
    before = journal_bytes(mounted.journal)
    n = 40
    for i in range(n):
        entry = "".join(f"2026-11-23T10:{i:02d}:{k:02d} INFO worker-{k % 7} handled request "
                        f"{i * 1000 + k} in {(i * 7 + k * 13) % 997} ms\n" for k in range(20))
        with open(p, "ab") as f:
            f.write(entry.encode()[:1024])
            f.flush()
            os.fsync(f.fileno())
    after = journal_bytes(mounted.journal)
    with Journal.open(str(mounted.journal), readonly=True) as j, j.reader() as r:
        stored = r.stats()["stored_bytes"] - stored0
    mounted.umount()
    assert stored < n * 1024 * 1.2, f"{stored} bytes stored for {n} KiB appended"
    assert after - before < n * 16 << 10, f"data file grew {after - before} bytes"
    assert content_versions(mounted.journal, "app.log")[-1][3] == (mounted.src / "app.log").read_bytes()


def test_identical_saves_add_no_chunks(mounted):
    data = os.urandom(300_000)
    p = mounted.mnt / "same.bin"
    save(p, data)
    with Journal.open(str(mounted.journal), readonly=True) as j, j.reader() as r:
        chunks = r.stats()["chunks"]
    for _ in range(5):
        save(p, data)
    save(mounted.mnt / "copy.bin", data)
    with Journal.open(str(mounted.journal), readonly=True) as j, j.reader() as r:
        assert r.stats()["chunks"] == chunks
    mounted.umount()


def test_ignored_files_never_journaled(mounted):
    (mounted.src / ".deltaignore").write_text("build/\n*.o\n")
    mounted.umount()
    mounted.start()
    os.mkdir(mounted.mnt / "build")
    save(mounted.mnt / "build" / "out.bin", b"x")
    save(mounted.mnt / "main.o", b"obj")
    save(mounted.mnt / "main.c", b"int main;")
    save(mounted.mnt / ".main.c.swp", b"swap")
    assert (mounted.src / "build" / "out.bin").read_bytes() == b"x"  # still works in the mount
    mounted.umount()
    paths = {r.path for r in all_records(mounted.journal)}
    assert b"main.c" in paths
    assert not paths & {b"build", b"build/out.bin", b"main.o", b".main.c.swp"}


def test_a_deltaignore_saved_through_the_mount_applies_at_once(mounted):
    m = mounted.mnt
    save(m / "before.log", b"journaled: no pattern yet")
    save(m / ".deltaignore", b"*.log\n")  # saved in place
    save(m / "after.log", b"not journaled")
    save(m / "kept.txt", b"journaled")
    save(m / ".deltaignore.new", b"*.bak\n")  # an editor's save: a new file renamed over the old one
    os.rename(m / ".deltaignore.new", m / ".deltaignore")
    save(m / "again.log", b"journaled again")
    save(m / "first.bak", b"not journaled")
    os.unlink(m / ".deltaignore")  # deleted: only the built-in patterns are left
    save(m / "second.bak", b"journaled")
    mounted.umount()
    paths = {r.path for r in all_records(mounted.journal)}
    assert {b"before.log", b".deltaignore", b"kept.txt", b"again.log", b"second.bak"} <= paths
    assert not paths & {b"after.log", b"first.bak"}


def test_preexisting_files_restorable_as_they_were(mount_factory, tmp_path):
    src = tmp_path / "pre"
    (src / "sub").mkdir(parents=True)
    (src / "old.txt").write_bytes(b"original content\n")
    (src / "sub" / "gone.txt").write_bytes(b"about to be deleted\n")
    m = mount_factory(src)
    save(m.mnt / "old.txt", b"changed\n")
    os.unlink(m.mnt / "sub" / "gone.txt")
    m.umount()
    assert content_versions(m.journal, "old.txt")[0][3] == b"original content\n"
    assert content_versions(m.journal, "sub/gone.txt")[0][3] == b"about to be deleted\n"


def test_changes_while_unmounted_are_recorded_at_remount(mounted):
    save(mounted.mnt / "a.txt", b"through the mount\n")
    (mounted.mnt / "b.txt").write_bytes(b"doomed\n")
    mounted.umount()
    (mounted.src / "a.txt").write_bytes(b"behind its back\n")
    (mounted.src / "new.txt").write_bytes(b"new while unmounted\n")
    os.unlink(mounted.src / "b.txt")
    mounted.start()
    mounted.umount()
    vs = content_versions(mounted.journal, "a.txt")
    assert vs[-1][3] == b"behind its back\n" and vs[-1][1] == "scan"
    assert content_versions(mounted.journal, "new.txt")[-1][3] == b"new while unmounted\n"
    assert any(r.op == "unlink" and r.path == b"b.txt" for r in all_records(mounted.journal))


def test_a_touch_while_unmounted_is_a_setattr_not_a_version(mounted):
    save(mounted.mnt / "a.txt", b"same bytes\n")
    mounted.umount()
    os.utime(mounted.src / "a.txt", ns=(1_600_000_000 * 10**9, 1_600_000_000 * 10**9))
    mounted.start()
    mounted.umount()
    assert [v[3] for v in content_versions(mounted.journal, "a.txt")] == [b"same bytes\n"]
    last = [r for r in all_records(mounted.journal) if r.path == b"a.txt"][-1]
    assert last.op == "setattr" and last.mtime_ns == 1_600_000_000 * 10**9
    mounted.start()  # the journal now agrees with SRC: nothing more to record
    mounted.umount()
    assert [r for r in all_records(mounted.journal) if r.path == b"a.txt"][-1].seq == last.seq


def pack_bytes(journal_dir) -> int:
    return sum(p.stat().st_size for p in (Path(journal_dir) / "packs").glob("*.pack"))


def test_a_database_updated_in_place_stores_about_what_changed(mounted):
    """SQLite rewrites pages where they are: each transaction is one version,
    costs about the pages it changed, and every version restores exactly;
    a touch while unmounted adds no version, and a change made while
    unmounted is one scan version (the scan compares at the version's own
    boundaries: an in-place list is not what a fresh chunking would cut)."""
    rnd = random.Random(4)
    db = sqlite3.connect(mounted.mnt / "notes.db", isolation_level=None)
    db.execute("PRAGMA synchronous=FULL")  # the fsync returns once the version is committed
    db.execute("create table notes (id integer primary key, body text)")
    db.execute("begin")
    db.executemany("insert into notes values (?, ?)", [(i, rnd.randbytes(100).hex()) for i in range(4000)])
    db.execute("commit")
    states = [(mounted.mnt / "notes.db").read_bytes()]
    assert len(states[0]) > 512 * 1024
    before = pack_bytes(mounted.journal)
    for _ in range(30):
        db.execute("update notes set body = ? where id = ?", (rnd.randbytes(100).hex(), rnd.randrange(4000)))
        states.append((mounted.mnt / "notes.db").read_bytes())
    grown = pack_bytes(mounted.journal) - before
    db.close()
    assert grown < 30 * 2048, f"{grown} bytes stored for 30 one-row updates"
    mounted.umount()
    vs = content_versions(mounted.journal, "notes.db")
    assert [v[3] for v in vs[-31:]] == states  # one version per transaction, exact bytes
    with Journal.open(str(mounted.journal), readonly=True) as j, j.reader() as r:
        refs = r.chunk_list(vs[-1][0])
    starts = chunking.list_offsets(refs)[:-1]
    assert sum(o % chunking.ALIGNED_BLOCK == 0 for o in starts) > len(starts) // 4  # pages cut aligned
    os.utime(mounted.src / "notes.db", ns=(1_600_000_000 * 10**9,) * 2)  # touched while unmounted
    mounted.start()
    mounted.umount()
    assert content_versions(mounted.journal, "notes.db")[-1][0] == vs[-1][0]  # same bytes: no version
    con = sqlite3.connect(mounted.src / "notes.db")  # changed behind deltafs' back
    con.execute("update notes set body = 'offline' where id = 7")
    con.commit()
    con.close()
    offline = (mounted.src / "notes.db").read_bytes()
    mounted.start()
    mounted.umount()
    after = content_versions(mounted.journal, "notes.db")
    assert len(after) == len(vs) + 1 and (after[-1][1], after[-1][3]) == ("scan", offline)


def test_kill_9_during_writes_then_remount_recovers(mounted):
    writer = subprocess.Popen(
        ["python3", "-c", "import os,sys\n"
         "d=sys.argv[1]\n"
         "i=0\n"
         "while True:\n"
         "    p=os.path.join(d, f'f{i%50}.bin')\n"
         "    with open(p,'wb') as f: f.write(os.urandom(100000))\n"
         "    i+=1\n"
         "    if i == 200: print('busy', flush=True)\n", str(mounted.mnt)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert writer.stdout.readline() == b"busy\n"  # heavy writing is under way
        mounted.proc.send_signal(signal.SIGKILL)
        mounted.proc.wait(timeout=30)
    finally:
        writer.kill()
        writer.wait(timeout=30)
    mounted.proc = None
    mounted.kill()  # clears the dead mount
    mounted.start()
    mounted.umount()
    with Journal.open(str(mounted.journal), readonly=True) as j, j.reader() as r:
        report = j.verify(full=True)
        assert report.ok, report.problem
        assert report.records > 0 and report.chunks_checked > 0
        tree = r.tree_at()
        for name in os.listdir(mounted.src):
            if name.startswith("f"):
                entry = tree[name.encode()]
                assert r.read_content(entry.content_seq) == (mounted.src / name).read_bytes(), name


def test_git_and_sqlite_are_journaled(mounted):
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    repo = mounted.mnt / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True, env=env)
    for i in range(20):
        (repo / f"m{i}.py").write_text(f"x = {i}\n")
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True, env=env)
    subprocess.run(["git", "commit", "-qm", "c1"], cwd=repo, check=True, env=env)
    db = sqlite3.connect(mounted.mnt / "db.sqlite")
    db.execute("create table t (x)")
    for i in range(200):
        db.execute("insert into t values (?)", (i,))
        db.commit()
    db.close()
    mounted.umount()  # asserts the daemon logged no error or warning
    vs = content_versions(mounted.journal, "db.sqlite")
    assert vs, "sqlite database has versions"
    import tempfile
    with tempfile.NamedTemporaryFile(suffix=".sqlite") as f:
        f.write(vs[-1][3])
        f.flush()
        assert sqlite3.connect(f.name).execute("select count(*) from t").fetchone()[0] == 200
    assert content_versions(mounted.journal, "repo/m3.py")[-1][3] == b"x = 3\n"


def test_metadata_of_the_mount_root_is_not_a_failure(mounted):
    """The root is no entry of the journal's tree: chmod and xattrs on MNT itself
    change SRC's root as natively and are not recorded (they used to be
    refused by the journal, counted as failures, and force a rescan)."""
    os.setxattr(mounted.mnt, "user.k", b"v")
    os.chmod(mounted.mnt, 0o750)
    save(mounted.mnt / "f", b"after\n")
    assert os.getxattr(mounted.src, "user.k") == b"v"
    assert os.stat(mounted.src).st_mode & 0o777 == 0o750
    st = json.loads(run_cli("status", mounted.mnt, "--json", check=True).stdout)
    assert st["capture"]["failures"] == 0 and st["capture"]["gap"] == 0
    mounted.umount()
    assert [v[3] for v in content_versions(mounted.journal, "f")] == [b"after\n"]


def test_scan_records_xattrs_set_in_src_before_mounting(mount_factory, tmp_path):
    """Files and directories found by the mount's scan keep their user xattrs:
    a restore brings them back (they used to be dropped)."""
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f").write_bytes(b"tagged\n")
    os.setxattr(src / "d" / "f", "user.tag", b"blue")
    os.setxattr(src / "d", "user.dir", b"yes")
    m = mount_factory(src)
    m.umount()
    dest = tmp_path / "dest"
    run_cli("restore", "--journal", m.journal, "", "--to", dest, check=True)
    assert (dest / "d" / "f").read_bytes() == b"tagged\n"
    assert os.getxattr(dest / "d" / "f", "user.tag") == b"blue"
    assert os.getxattr(dest / "d", "user.dir") == b"yes"
