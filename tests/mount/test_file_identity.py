"""History follows files, not guesses (issue 18): a renamed or still-linked
file never inherits a newcomer's content.

Each case runs on a fresh mount, with `deltafs flush` after every step.
After each step, for every path the case uses:

* `deltafs cat PATH` prints what SRC holds there (or fails when it is absent);
* `deltafs restore MNT --version V --to DEST` of the moment right after the
  step equals SRC as it was then, for every step so far;
* every content version `deltafs log PATH` lists held content the path
  really held at some step, and the current content is among them.

The rules are in docs/design.md, "File identity".
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from fusetools import run_cli

pytestmark = pytest.mark.timeout(180)


def save(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def snapshot(root: Path) -> dict:
    """path -> (type, content or link target, permission bits) of everything under root;
    hard-link groups as sets of paths."""
    out: dict[str, tuple] = {}
    inodes: dict[int, list[str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            rel = str(p.relative_to(root))
            st = p.lstat()
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("l", os.readlink(p), None)
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("d", None, stat.S_IMODE(st.st_mode))
            else:
                out[rel] = ("f", p.read_bytes(), stat.S_IMODE(st.st_mode))
                inodes.setdefault(st.st_ino, []).append(rel)
    groups = sorted(sorted(g) for g in inodes.values() if len(g) > 1)
    return {"entries": out, "links": groups}


def log_json(*args) -> list[dict]:
    res = run_cli("log", "--records", *args, "--json", check=True)
    return [json.loads(x) for x in res.stdout.decode().splitlines()]


class Case:
    """One scenario on a fresh mount, checked after every step."""

    def __init__(self, mount, tmp: Path, paths: list[str]) -> None:
        self.m = mount
        self.tmp = tmp
        self.paths = paths
        self.moments: list[tuple[int, dict]] = []  # (head version, SRC then)
        self.held: dict[str, set[bytes]] = {p: set() for p in paths}

    def step(self, fn) -> None:
        fn(self.m.mnt)
        run_cli("flush", self.m.mnt, check=True)
        now = snapshot(self.m.mnt)
        for p in self.paths:
            e = now["entries"].get(p)
            if e is not None and e[0] == "f":
                self.held[p].add(e[1])
        head = log_json(self.m.mnt, "-n", "1")[0]["version"]
        self.moments.append((head, now))
        self.check(now)

    def contents(self, entries: list[dict]) -> set[bytes]:
        """The content of every content version listed (read where it was written)."""
        return {run_cli("cat", "--journal", self.m.journal, d["path"], "--version", d["version"],
                        check=True).stdout for d in entries if d["op"] == "write"}

    def check(self, now: dict) -> None:
        for p in self.paths:
            e = now["entries"].get(p)
            res = run_cli("cat", self.m.mnt / p)
            if e is None:
                assert res.returncode != 0, f"cat {p}: exists in the journal, not in SRC"
            elif e[0] == "f":
                assert res.returncode == 0, f"cat {p}: {res.stderr.decode()}"
                assert res.stdout == e[1], f"cat {p}: {res.stdout!r} but SRC holds {e[1]!r}"
            if run_cli("log", "--records", self.m.mnt / p).returncode != 0:
                assert e is None, f"log {p} fails but SRC has it"
                continue
            listed = self.contents(log_json(self.m.mnt / p))
            assert all(d["path"] == p or d.get("path2") == p for d in log_json(self.m.mnt / p))
            assert listed <= self.held[p] | {b""}, \
                f"log {p} lists content the path never held: {listed - self.held[p]}"
            if e is not None and e[0] == "f" and e[1]:
                followed = self.contents(log_json(self.m.mnt / p, "--follow"))
                assert e[1] in followed, f"log --follow {p} lacks its current content {e[1]!r}"
        for i, (version, then) in enumerate(self.moments):
            dest = self.tmp / f"restore-{len(self.moments)}-{i}"
            run_cli("restore", self.m.mnt, "--version", version, "--to", dest, check=True)
            got = snapshot(dest)
            assert got == then, f"restore at version {version} (step {i + 1}) differs from SRC then"


@pytest.fixture
def case(mounted, tmp_path):
    return lambda *paths: Case(mounted, tmp_path, list(paths))


def test_rename_then_recreate_keeps_both_histories(case):
    c = case("a.txt", "c.txt")
    c.step(lambda m: save(m / "a.txt", b"A\n"))
    c.step(lambda m: os.rename(m / "a.txt", m / "c.txt"))
    c.step(lambda m: save(m / "a.txt", b"A2\n"))
    c.step(lambda m: save(m / "c.txt", b"A edited\n"))


def test_log_rotation(case):
    c = case("app.log", "app.log.1", "app.log.2")
    c.step(lambda m: save(m / "app.log", b"log1\n"))
    c.step(lambda m: os.rename(m / "app.log", m / "app.log.1"))
    c.step(lambda m: save(m / "app.log", b"log2\n"))
    c.step(lambda m: (os.rename(m / "app.log.1", m / "app.log.2"), os.rename(m / "app.log", m / "app.log.1")))
    c.step(lambda m: save(m / "app.log", b"log3\n"))


def test_remove_one_hard_link_then_recreate(case):
    c = case("x", "y")
    c.step(lambda m: save(m / "x", b"X\n"))
    c.step(lambda m: os.link(m / "x", m / "y"))
    c.step(lambda m: os.unlink(m / "x"))
    c.step(lambda m: save(m / "x", b"X2\n"))
    c.step(lambda m: save(m / "y", b"Y edited\n"))


def test_delete_then_save_through_an_ignored_temp(case):
    c = case("f")
    c.step(lambda m: save(m / "f", b"1\n"))
    c.step(lambda m: os.unlink(m / "f"))
    c.step(lambda m: (save(m / "f.swp", b"2\n"), os.rename(m / "f.swp", m / "f")))
    c.step(lambda m: save(m / "f", b"3\n"))
    c.m.umount()
    vs = [d for d in log_json(c.m.src / "f") if d["op"] == "write"]
    assert len({d["file_id"] for d in vs}) == 1, "a gone file's editor save continues its history"


def test_backup_rename_then_edit(case):
    c = case("f", "f.bak")
    c.step(lambda m: save(m / "f", b"one\n"))
    c.step(lambda m: os.rename(m / "f", m / "f.bak"))
    c.step(lambda m: save(m / "f", b"two\n"))
    c.step(lambda m: save(m / "f.bak", b"one, edited\n"))


def test_save_over_a_hard_linked_file_leaves_the_other_link(case):
    c = case("doc", "doc-link", "doc.new")
    c.step(lambda m: save(m / "doc", b"v1\n"))
    c.step(lambda m: os.link(m / "doc", m / "doc-link"))
    c.step(lambda m: save(m / "doc.new", b"v2\n"))
    c.step(lambda m: os.rename(m / "doc.new", m / "doc"))
    c.step(lambda m: (save(m / "doc.swp", b"v3\n"), os.rename(m / "doc.swp", m / "doc")))


def test_rename_between_two_links_of_one_file_changes_nothing(case):
    c = case("p", "q")
    c.step(lambda m: save(m / "p", b"P\n"))
    c.step(lambda m: os.link(m / "p", m / "q"))
    c.step(lambda m: os.rename(m / "p", m / "q"))  # rename(2): both names stay
    c.step(lambda m: save(m / "q", b"Q\n"))


def test_delete_then_rename_another_file_onto_the_path(case):
    c = case("f", "g")
    c.step(lambda m: (save(m / "f", b"F\n"), save(m / "g", b"G\n")))
    c.step(lambda m: os.unlink(m / "f"))
    c.step(lambda m: os.rename(m / "g", m / "f"))
    c.step(lambda m: save(m / "g", b"G2\n"))


# --- journals written by the old rule ------------------------------------------------

def _old_rule_journal(src: Path) -> None:
    """What the old re-created-path rule wrote for `echo A > a.txt; mv a.txt
    c.txt; echo A2 > a.txt`: the new a.txt continued the identity of the file
    now at c.txt, so c.txt's current content in the journal is A2."""
    from deltafs import chunking
    from deltafs.journal import Change, Journal

    def write(fid, path, data):
        nc = chunking.build_chunk(data, None)
        st = os.stat(src / path.decode())
        return Change(op="write", file_id=fid, path=path, size=len(data), cause="write", base_seq=0,
                      edit=[(0, 0, [(nc.id, len(data))])], chunks=[nc], mode=st.st_mode,
                      mtime_ns=st.st_mtime_ns)

    fid = 0x1234
    (src / "c.txt").write_bytes(b"A\n")
    (src / "a.txt").write_bytes(b"A2\n")
    with Journal.open(str(src / ".deltafs"), create=True) as j:
        j.commit([Change(op="create", file_id=fid, path=b"a.txt", mode=0o100644)])
        j.commit([write(fid, b"a.txt", b"A\n")])
        j.commit([Change(op="rename", file_id=fid, path=b"a.txt", path2=b"c.txt")])
        j.commit([Change(op="create", file_id=fid, path=b"a.txt", mode=0o100644)])  # the old rule
        j.commit([write(fid, b"a.txt", b"A2\n")])


def test_verify_full_reports_a_merged_history_and_a_mount_repairs_it(mount_factory, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    _old_rule_journal(src)
    assert run_cli("cat", src / "c.txt", check=True).stdout == b"A2\n"  # the merged history
    res = run_cli("verify", "--full", src)
    assert res.returncode == 1, res.stderr.decode()
    out = res.stdout.decode()
    assert "DIFFERS c.txt: merged history" in out and "a.txt" not in out.split("DIFFERS c.txt")[0]
    assert "versions recorded under it from another file: 5" in out  # A2, written at a.txt
    js = json.loads(run_cli("verify", "--full", "--json", src).stdout.decode().splitlines()[-1])
    assert [d["path"] for d in js["tree_differs"]] == ["c.txt"]

    m = mount_factory(src)  # its scan records c.txt again, on its own
    assert (m.mnt / "c.txt").read_bytes() == b"A\n"
    assert run_cli("cat", m.mnt / "c.txt", check=True).stdout == b"A\n"
    assert run_cli("cat", m.mnt / "a.txt", check=True).stdout == b"A2\n"
    rows = log_json(m.mnt / "c.txt")
    assert rows[0]["op"] == "write" and rows[0]["cause"] == "repair"
    m.umount(check=False)
    assert "recorded again (cause repair" in m.log_text()
    res = run_cli("verify", "--full", src)
    assert res.returncode == 0 and "DIFFERS" not in res.stdout.decode(), res.stdout.decode()


def test_verify_full_reports_content_and_presence_drift(mount_factory, tmp_path):
    m = mount_factory()
    save(m.mnt / "kept", b"same\n")
    save(m.mnt / "changed", b"old\n")
    m.umount()
    (m.src / "changed").write_bytes(b"new\n")  # behind the journal's back (the next mount's scan records it)
    (m.src / "added").write_bytes(b"x")
    os.unlink(m.src / "kept")
    out = run_cli("verify", "--full", m.src).stdout.decode()
    assert "DIFFERS added: in SRC, missing from the journal" in out
    assert "DIFFERS changed: content differs from SRC" in out
    assert "DIFFERS kept: in the journal, not in SRC" in out
    assert run_cli("verify", m.src).returncode == 0  # without --full: the chain only
