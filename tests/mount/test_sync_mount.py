"""Two mounted members of one sync group on one machine (separate SRC, journal, mount each).

Remote states are applied through the mount by the daemon's sync service;
`group sync -m MNT` asks the daemon for a pass now (the test does not wait
for the timer).  Reads through the other mount see the new content (the
kernel's caches stay right), concurrent edits give the same conflict on
both, a file open for writing is never replaced under its writer, and
resolving through the mounts converges.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from fusetools import run_cli

from deltafs.journal import Journal

pytestmark = pytest.mark.timeout(240)


def cli(*args, ok=True):
    res = run_cli(*args)
    res.stdout, res.stderr = res.stdout.decode(), res.stderr.decode()
    if ok:
        assert res.returncode == 0, (args, res.stdout, res.stderr)
    return res


def conflict_set(mnt: Path) -> set:
    rows = [json.loads(x) for x in cli("conflicts", "-m", mnt, "--json").stdout.splitlines()]
    return {(c["path"], frozenset([c["local"]["version"]] + [h["version"] for h in c["remote"]])) for c in rows}


def sync_all(*mnts):
    for _ in range(2):
        for m in mnts:
            cli("group", "sync", "-m", m)


def test_two_mounted_members(tmp_path, mount_factory):
    url = f"file://{tmp_path}/store"
    a_src = tmp_path / "a"
    a_src.mkdir()
    (a_src / "notes.md").write_text("one\n")
    Journal.open(a_src / ".deltafs", create=True).close()
    cli("group", "join", url, "-m", a_src)
    cli("clone", url, tmp_path / "b", "--join")
    a = mount_factory(a_src)
    b = mount_factory(tmp_path / "b")

    # read through b first: its page cache holds "one" (keep_cache), then a's edit arrives
    assert (b.mnt / "notes.md").read_text() == "one\n"
    (a.mnt / "notes.md").write_text("two, from a\n")
    (a.mnt / "sub").mkdir()
    (a.mnt / "sub" / "new.txt").write_text("new\n")
    sync_all(a.mnt, b.mnt)
    assert (b.mnt / "notes.md").read_text() == "two, from a\n"
    assert (b.mnt / "sub" / "new.txt").read_text() == "new\n"
    assert (b.src / "notes.md").read_text() == "two, from a\n"
    log = [json.loads(x) for x in cli("log", b.mnt / "notes.md", "--json").stdout.splitlines()]
    assert len(log) >= 2  # the applied version is in b's history, saying where it came from
    a_dev = json.loads(cli("group", "list", "-m", a.mnt, "--json").stdout)["device"]
    assert log[0]["cause"] == "sync" and log[0]["origin"].startswith(a_dev + ":"), log[0]
    recs = [json.loads(x) for x in cli("log", b.mnt / "sub", "--json", "--records").stdout.splitlines()]
    assert any(r.get("origin", "").startswith(a_dev) and r["path"] == "sub/new.txt" for r in recs), recs

    # a file open for writing on b is never replaced under its writer
    with open(b.mnt / "notes.md", "w") as f:
        f.write("b is writing\n")
        f.flush()
        (a.mnt / "notes.md").write_text("three, from a\n")
        sync_all(a.mnt, b.mnt)
        assert (b.src / "notes.md").read_text() == "b is writing\n"
    sync_all(b.mnt, a.mnt)
    # the two saves were concurrent: one conflict, the same on both, each tree keeps its own file
    sa, sb = conflict_set(a.mnt), conflict_set(b.mnt)
    assert len(sa) == 1 and sa == sb, (sa, sb)
    assert (a.mnt / "notes.md").read_text() == "three, from a\n"
    assert (b.mnt / "notes.md").read_text() == "b is writing\n"
    assert sorted(os.listdir(b.mnt)) == ["notes.md", "sub"]  # no conflict copies in the tree

    # resolve on b, taking a's version: both converge
    cli("resolve", "notes.md", "--take", "remote", "-m", b.mnt)
    sync_all(a.mnt, b.mnt)
    assert (b.mnt / "notes.md").read_text() == "three, from a\n"
    assert (a.mnt / "notes.md").read_text() == "three, from a\n"
    assert conflict_set(a.mnt) == set() and conflict_set(b.mnt) == set()

    # a delete propagates, and a's service takes it by itself (its timer: every 5 s)
    (b.mnt / "sub" / "new.txt").unlink()
    cli("group", "sync", "-m", b.mnt)
    deadline = time.monotonic() + 30
    while (a.src / "sub" / "new.txt").exists() and time.monotonic() < deadline:
        time.sleep(0.2)  # polling a's SRC: the pass comes from a's own timer
    assert not (a.mnt / "sub" / "new.txt").exists()
    st = json.loads(cli("status", a.mnt, "--json").stdout)["group"]
    assert st["service"]["passes"] >= 1 and st["service"]["last_error"] is None and st["conflicts"] == 0
    a.umount()
    b.umount()


def test_mount_group_joins_and_pause_keeps_capture(tmp_path, mount_factory):
    """mount --group URL joins (and syncs once) before mounting; pause --group stops the passes,
    not capture; resume --group takes up where it stopped."""
    url = f"file://{tmp_path}/store"
    a_src = tmp_path / "a"
    a_src.mkdir()
    (a_src / "notes.md").write_text("one\n")
    a = mount_factory(a_src, "--group", url)  # makes the group (its store was empty)
    b = mount_factory(tmp_path / "b", "--group", url)  # an empty tree joins: it gets a's files
    assert (b.mnt / "notes.md").read_text() == "one\n"
    assert json.loads(cli("status", b.mnt, "--json").stdout)["group"]["url"] == url
    b.umount()
    (tmp_path / "mnt-x").mkdir()
    res = cli("mount", tmp_path / "b", tmp_path / "mnt-x", "--group", f"file://{tmp_path}/other", ok=False)
    assert res.returncode == 2 and "member of the group at" in res.stderr and "Traceback" not in res.stderr
    b = mount_factory(tmp_path / "b", "--group", url, mnt=tmp_path / "mnt-b2")  # a member already: no-op

    out = json.loads(cli("pause", "--group", b.mnt, "--json").stdout)
    assert out["paused"] is True and out["was_paused"] is False
    (a.mnt / "notes.md").write_text("two, from a\n")
    cli("group", "sync", "-m", a.mnt)
    res = cli("group", "sync", "-m", b.mnt, ok=False)
    assert res.returncode == 2 and "paused" in res.stderr and res.stderr.count("\n") == 1
    (b.mnt / "local.txt").write_text("b keeps recording\n")
    assert "local.txt" in cli("log", b.mnt / "local.txt").stdout  # capture goes on
    assert (b.mnt / "notes.md").read_text() == "one\n"
    assert json.loads(cli("status", b.mnt, "--json").stdout)["group"]["service"]["paused"] is True

    cli("resume", "--group", b.mnt)
    sync_all(b.mnt, a.mnt)
    assert (b.mnt / "notes.md").read_text() == "two, from a\n"
    assert (a.mnt / "local.txt").read_text() == "b keeps recording\n"

    # a pass that fails says why to the one who asked for it (not an empty report)
    b_dev = json.loads(cli("group", "list", "-m", b.mnt, "--json").stdout)["device"]
    head = tmp_path / "store" / "heads" / f"{b_dev}.json"
    good = head.read_bytes()
    head.write_bytes(b"{not json")
    res = cli("group", "sync", "-m", a.mnt, ok=False)
    assert res.returncode != 0 and "is corrupt" in res.stderr and "Traceback" not in res.stderr, res.stderr
    head.write_bytes(good)
    cli("group", "sync", "-m", a.mnt)
    a.umount(check=False)  # a's log holds the failed pass's ERROR line
    b.umount()
    assert "is corrupt" in a.log_text()


def test_kill_9_mid_apply_is_finished_by_the_next_mount(tmp_path, mount_factory, monkeypatch):
    """The daemon of a mounted member dies (SIGKILL) after an apply reached SRC and before its
    journal recorded it; the next mount finishes the apply: no loss, no duplicate, nothing
    published back.  The kill point is a test hook (DELTAFS_TEST_SYNC_KILL): no timing could
    hit that window reliably, and the kill itself is a real SIGKILL of the daemon."""
    from deltafs.sync import state as S

    url = f"file://{tmp_path}/store"
    a_src = tmp_path / "a"
    a_src.mkdir()
    (a_src / "notes.md").write_text("one\n")
    Journal.open(a_src / ".deltafs", create=True).close()
    cli("group", "join", url, "-m", a_src)
    cli("clone", url, tmp_path / "b", "--join")
    a = mount_factory(a_src)
    monkeypatch.setenv("DELTAFS_TEST_SYNC_KILL", "after-write")
    b = mount_factory(tmp_path / "b")
    monkeypatch.delenv("DELTAFS_TEST_SYNC_KILL")
    numbered = S.load(str(b.journal)).numbered

    (a.mnt / "notes.md").write_text("two, from a\n")
    cli("group", "sync", "-m", a.mnt)
    assert b.proc.wait(timeout=60) == -9  # b's own timer pass applied it, and died there
    b.kill()  # clears the dead mount
    assert (b.src / "notes.md").read_text() == "two, from a\n"  # SRC has it
    assert S.load(str(b.journal)).intents  # the journal was not told: the intent stands

    b = mount_factory(tmp_path / "b", mnt=tmp_path / "mnt-b2")
    cli("group", "sync", "-m", b.mnt)
    st = S.load(str(b.journal))
    assert not st.intents and not st.pending and not st.conflicts
    assert st.numbered == numbered  # finishing the apply published nothing back
    with Journal.open(b.journal, readonly=True) as j, j.reader() as r:
        contents = [r.read_content(rec.seq) for rec in r.records() if rec.is_content and rec.path == b"notes.md"]
    assert contents.count(b"two, from a\n") == 1 and contents[-1] == b"two, from a\n", contents
    assert (b.mnt / "notes.md").read_text() == "two, from a\n"
    # the version the mount-time scan finished is a sync from a, as the apply would have made it
    a_dev = json.loads(cli("group", "list", "-m", a.mnt, "--json").stdout)["device"]
    top = json.loads(cli("log", b.mnt / "notes.md", "--json").stdout.splitlines()[0])
    assert top["cause"] == "sync" and top["origin"].startswith(a_dev + ":"), top
    assert top["origin"] in st.origins.values()
    cli("group", "sync", "-m", a.mnt)
    assert conflict_set(a.mnt) == set() and conflict_set(b.mnt) == set()
    (b.mnt / "notes.md").write_text("three, from b\n")  # and the member goes on syncing
    sync_all(b.mnt, a.mnt)
    assert (a.mnt / "notes.md").read_text() == "three, from b\n"
    a.umount()
    b.umount()


def test_mounted_guard_holds_a_damaging_peer(tmp_path, mount_factory):
    """b's daemon scores a's incoming segment: text files turned to random bytes are held, not
    applied, until `deltafs guard resume MNT`; b's own capture goes on meanwhile."""
    url = f"file://{tmp_path}/store"
    a_src = tmp_path / "a"
    a_src.mkdir()
    files = {f"doc{i}.txt": "a normal line of text, written by hand\n" * 60 for i in range(8)}
    for n, text in files.items():
        (a_src / n).write_text(text)
    a = mount_factory(a_src, "--group", url, "--guard", "off")  # a's own guard would alert on a's writes
    b = mount_factory(tmp_path / "b", "--group", url)
    for n in files:
        (a.mnt / n).write_bytes(os.urandom(4096))
    cli("group", "sync", "-m", a.mnt)
    rep = json.loads(cli("group", "sync", "-m", b.mnt, "--json").stdout)
    assert rep["held"] == 1 and rep["applied"] == 0, rep
    assert all((b.mnt / n).read_text() == files[n] for n in files)
    (b.mnt / "mine.txt").write_text("b goes on\n")
    assert "mine.txt" in cli("log", b.mnt / "mine.txt").stdout
    peer = json.loads(cli("status", b.mnt, "--json").stdout)["group"]["peers"][0]
    assert peer["held"]["files"] >= 5, peer
    out = json.loads(cli("guard", "resume", b.mnt, "--json").stdout)
    assert out["sync_released"] == [peer["device"]], out
    cli("group", "sync", "-m", b.mnt)
    assert all((b.mnt / n).read_bytes() == (a.mnt / n).read_bytes() for n in files)
    a.umount()
    b.umount(check=False)  # b's log holds the guard's ERROR line, as it should
    assert "the damage guard holds peer" in b.log_text()


def _stream(url: str, journal: Path, dev: str) -> list[dict]:
    """Every event of dev's stream as its head.json names it, checked as a peer checks it."""
    from deltafs import sync
    from deltafs.sync import store as G

    store = sync.open_store(url, str(journal))
    with store:
        head = G.read_head(store, dev)
        out, prev = [], bytes(32)
        for seg in head.segments:
            evs, prev = G.decode_segment(store.get(seg["name"]), seg["name"], url, dev, seg["first"], seg["last"],
                                         prev)
            out.extend(evs)
    assert [e["n"] for e in out] == list(range(1, head.last + 1)) and prev.hex() == head.last_hash
    return out


@pytest.mark.parametrize("point", ["after-segment", "after-head"])
def test_kill_9_mid_upload_then_remount(tmp_path, mount_factory, monkeypatch, point):
    """b's daemon dies (SIGKILL) in the middle of publishing a save: after its segment reached the
    store and before its head.json named it, or after the head.json and before b's sync state
    recorded it (a peer may have read the events by then).  b changes more while down, is
    mounted again: nothing is lost, no event is in b's stream twice, a applies each save once
    and converges.  The kill point is a test hook (DELTAFS_TEST_SYNC_KILL); the kill is real."""
    from deltafs.sync import state as S

    url = f"file://{tmp_path}/store"
    a_src = tmp_path / "a"
    a_src.mkdir()
    (a_src / "notes.md").write_text("one\n")
    Journal.open(a_src / ".deltafs", create=True).close()
    cli("group", "join", url, "-m", a_src)
    cli("clone", url, tmp_path / "b", "--join")
    a = mount_factory(a_src)
    monkeypatch.setenv("DELTAFS_TEST_SYNC_KILL", point)
    b = mount_factory(tmp_path / "b")
    monkeypatch.delenv("DELTAFS_TEST_SYNC_KILL")
    b_dev = S.load(str(b.journal)).device

    (b.mnt / "new.txt").write_text("from b\n")
    cli("flush", b.mnt)
    assert b.proc.wait(timeout=60) == -9  # b's own timer pass published it, and died there
    b.kill()
    cli("group", "sync", "-m", a.mnt)  # after-head: a has read b's events already
    if point == "after-head":
        assert (a.mnt / "new.txt").read_text() == "from b\n"
    (b.src / "later.txt").write_text("made while b was down\n")  # the next upload is longer

    b = mount_factory(tmp_path / "b", mnt=tmp_path / "mnt-b2")
    sync_all(b.mnt, a.mnt)
    assert (a.mnt / "new.txt").read_text() == "from b\n"
    assert (a.mnt / "later.txt").read_text() == "made while b was down\n"
    assert conflict_set(a.mnt) == set() and conflict_set(b.mnt) == set()
    st = S.load(str(b.journal))
    events = _stream(url, b.journal, b_dev)
    assert len(events) == st.numbered == st.published
    paths = [e["p"] for e in events]
    assert paths.count(b"new.txt") == 1 and paths.count(b"later.txt") == 1, paths
    from deltafs import sync
    from deltafs.sync import store as G

    with sync.open_store(url, str(b.journal)) as store:  # no orphan of the crash is left (b's own)
        head = G.read_head(store, b_dev)
        objects = {n for n, _ in store.list(f"members/{b_dev}/")}
    assert objects == {s["name"] for s in head.segments} | set(head.packs), objects
    with Journal.open(a.journal, readonly=True) as j, j.reader() as r:
        applied = [rec for rec in r.records() if rec.is_content and rec.path == b"new.txt"]
    assert len(applied) == 1 and applied[0].cause == "sync", applied  # applied once
    (a.mnt / "notes.md").write_text("two, from a\n")  # and the group goes on
    sync_all(a.mnt, b.mnt)
    assert (b.mnt / "notes.md").read_text() == "two, from a\n"
    a.umount()
    b.umount(check=point != "after-head")
    if point == "after-head":  # b's log says it took the events its head named as published
        assert "were published before a crash recorded it" in b.log_text()


def test_resolve_merge_through_the_mounts(tmp_path, mount_factory):
    """resolve --merge on a mount: the daemon writes the merge through the mount (a sync version
    with b's resolve event as origin) and both members converge; overlapping edits: exit 1,
    markers in the file, the conflict stays open."""
    url = f"file://{tmp_path}/store"
    lines = [f"line {i}\n" for i in range(10)]
    a_src = tmp_path / "a"
    a_src.mkdir()
    (a_src / "notes.md").write_text("".join(lines))
    a = mount_factory(a_src, "--group", url)
    b = mount_factory(tmp_path / "b", "--group", url)
    (a.mnt / "notes.md").write_text("".join(["line 0 by a\n", *lines[1:]]))
    (b.mnt / "notes.md").write_text("".join([*lines[:9], "line 9 by b\n"]))
    sync_all(a.mnt, b.mnt)
    assert len(conflict_set(a.mnt)) == 1 and conflict_set(a.mnt) == conflict_set(b.mnt)
    cli("resolve", "notes.md", "--merge", "-m", b.mnt)
    both = "".join(["line 0 by a\n", *lines[1:9], "line 9 by b\n"])
    assert (b.mnt / "notes.md").read_text() == both
    sync_all(a.mnt, b.mnt)
    assert (a.mnt / "notes.md").read_text() == both
    assert conflict_set(a.mnt) == set() and conflict_set(b.mnt) == set()
    top = json.loads(cli("log", b.mnt / "notes.md", "--json").stdout.splitlines()[0])
    assert top["cause"] == "sync" and "origin" in top, top

    (a.mnt / "todo.md").write_text(both)  # the common ancestor of the edits below
    sync_all(a.mnt, b.mnt)
    assert (b.mnt / "todo.md").read_text() == both
    (a.mnt / "notes.md").write_text(both.replace("line 5\n", "five by a\n"))
    (b.mnt / "notes.md").write_text(both.replace("line 5\n", "five by b\n"))
    (a.mnt / "todo.md").write_text(both.replace("line 1\n", "one by a\n"))  # merges cleanly
    (b.mnt / "todo.md").write_text(both.replace("line 7\n", "seven by b\n"))
    sync_all(a.mnt, b.mnt)
    assert len(conflict_set(a.mnt)) == 2
    res = cli("resolve", "--all", "--merge", "-m", b.mnt, ok=False)  # notes.md does not stop todo.md
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("deltafs: notes.md: ") \
        and "conflict markers" in res.stderr, res.stderr
    assert res.stdout.startswith("todo.md: merged"), res.stdout
    assert "<<<<<<< local\nfive by b\n" in (b.mnt / "notes.md").read_text()
    sync_all(a.mnt, b.mnt)
    assert (a.mnt / "todo.md").read_text() == both.replace("line 1\n", "one by a\n").replace("line 7\n", "seven by b\n")
    assert len(conflict_set(a.mnt)) == 1 and conflict_set(a.mnt) == conflict_set(b.mnt)
    a.umount()
    b.umount(check=False)  # b's log holds the failed resolve's ERROR line


def test_timed_passes_wait_while_local_saves_pour_in(tmp_path, mount_factory):
    """A bulk copy into a member's mount: the timed passes (every 5 s) wait while the journal
    grows fast, so the copy does not share the daemon with a pass; once the saves stop, one
    pass publishes them all.  (On the old service a pass ran every 5 s during the burst.)"""
    url = f"file://{tmp_path}/store"
    a = mount_factory(tmp_path / "a", "--group", url)

    def service() -> dict:
        return json.loads(cli("status", a.mnt, "--json").stdout)["group"]["service"]

    deadline = time.monotonic() + 60
    while service()["passes"] < 1:  # the first timed pass: the burst starts right after one
        assert time.monotonic() < deadline, "no timed pass in 60 s"
        time.sleep(0.2)
    p0 = service()["passes"]
    (a.mnt / "bulk").mkdir()
    t0, i = time.monotonic(), 0
    while time.monotonic() - t0 < 9:  # nearly two intervals of steady saves
        with open(a.mnt / "bulk" / f"f{i}.txt", "w") as f:
            f.write(f"file {i}\n")
        i += 1
    during = service()
    assert during["passes"] == p0 and during["deferred_s"] >= 3, (during, i)
    deadline = time.monotonic() + 30
    while service()["passes"] == p0:  # quiet now: the next timed pass runs
        assert time.monotonic() < deadline, "no pass after the burst"
        time.sleep(0.2)
    rep = service()
    assert rep["last_error"] is None and rep["published"] >= i, (rep, i)
