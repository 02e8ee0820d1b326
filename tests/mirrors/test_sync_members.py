"""Sync groups through the CLI, unmounted members on one machine (docs/sync.md).

Each member is a SRC with its own journal; the shared store is a file://
directory, an encrypted one, or a SeaweedFS bucket.  Edits propagate,
concurrent edits give the same single conflict on every member, resolving
converges, and an apply interrupted after SRC changed but before the
journal heard of it is finished by the next pass, once.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1]))
from fusetools import run_cli  # noqa: E402
from s3server import BUCKET, s3_env, s3_server  # noqa: E402,F401 (fixtures)

from deltafs import sync  # noqa: E402
from deltafs.journal import Journal  # noqa: E402
from deltafs.sync import state as S  # noqa: E402


def cli(*args, ok=True, env=None):
    res = run_cli(*args, env=env)
    res.stdout, res.stderr = res.stdout.decode(), res.stderr.decode()
    if ok:
        assert res.returncode == 0, (args, res.stdout, res.stderr)
    return res


def new_tree(path: Path, files: dict | None = None) -> Path:
    path.mkdir()
    for name, data in (files or {}).items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text(data)
    Journal.open(path / ".deltafs", create=True).close()
    return path


def conflicts(tree: Path, env=None) -> list[dict]:
    out = cli("conflicts", "-m", tree, "--json", env=env).stdout
    return [json.loads(line) for line in out.splitlines()]


def conflict_set(tree: Path, env=None) -> set:
    """A conflict as every member sees it: path and the set of versions in it."""
    return {(c["path"], frozenset([c["local"]["version"]] + [h["version"] for h in c["remote"]]))
            for c in conflicts(tree, env)}


def settle(trees, env=None, rounds=3):
    for _ in range(rounds):
        for t in trees:
            cli("group", "sync", "-m", t, env=env)


def run_group(tmp_path: Path, url: str, env=None, members=3, extra=(), join_extra=()):
    a = new_tree(tmp_path / "a", {"notes.md": "one\n", "dir/x.txt": "x\n"})
    res = cli("group", "join", url, "-m", a, "--json", *extra, *join_extra, env=env)
    assert json.loads(res.stdout)["published"] == 3  # dir, dir/x.txt, notes.md
    others = []
    for i in range(1, members):
        t = tmp_path / f"m{i}"
        cli("clone", url, t, "--join", *extra, env=env)
        others.append(t)
    trees = [a, *others]
    for t in others:
        assert (t / "notes.md").read_text() == "one\n" and (t / "dir" / "x.txt").read_text() == "x\n"

    # an edit on one appears on the others; a new file, a delete, a rename
    (others[0] / "notes.md").write_text("two\n")
    (others[0] / "new.txt").write_text("new\n")
    os.rename(a / "dir" / "x.txt", a / "dir" / "y.txt")
    settle(trees, env)
    for t in trees:
        assert (t / "notes.md").read_text() == "two\n"
        assert (t / "new.txt").read_text() == "new\n"
        assert sorted(os.listdir(t / "dir")) == ["y.txt"]
        assert conflicts(t, env) == []
    # the journal says where an applied version came from (format 8: cause sync, origin DEVICE:N)
    dev = json.loads(cli("group", "list", "-m", others[0], "--json", env=env).stdout)["device"]
    for t in (a, *others[1:]):
        top = json.loads(cli("log", "notes.md", "--journal", t / ".deltafs", "--json", "-n", "1",
                             env=env).stdout.splitlines()[0])
        assert top["cause"] == "sync" and top["origin"].startswith(dev + ":"), top
    assert f"(from {dev}:" in cli("log", "notes.md", "--journal", a / ".deltafs", env=env).stdout
    mine = json.loads(cli("log", "notes.md", "--journal", others[0] / ".deltafs", "--json", "-n", "1",
                          env=env).stdout.splitlines()[0])
    assert "origin" not in mine and mine["cause"] != "sync"  # its own save is a local change

    # concurrent edits of one file: one conflict, the same on every member; trees keep their own file
    (a / "notes.md").write_text("from a\n")
    (others[-1] / "notes.md").write_text("from the last\n")
    settle(trees, env)
    sets = [conflict_set(t, env) for t in trees]
    assert len(sets[0]) == 1 and all(s == sets[0] for s in sets), sets
    assert (a / "notes.md").read_text() == "from a\n"
    assert (others[-1] / "notes.md").read_text() == "from the last\n"
    assert not any(n.startswith("notes") and n != "notes.md" for t in trees for n in os.listdir(t))  # no junk
    grp = json.loads(cli("status", a, "--json", env=env).stdout)["group"]
    assert grp["conflicts"] == 1 and grp["conflict_paths"] == ["notes.md"]
    assert len(grp["peers"]) == members - 1
    assert "deltafs_sync_conflicts" in cli("status", a, "--prometheus", env=env).stdout

    # resolve on a member that edited neither: everyone converges
    middle = others[0] if members > 2 else a
    take = "remote" if middle is a else conflicts(middle, env)[0]["remote"][0]["version"]
    cli("resolve", "--all", "--take", take, "-m", middle, env=env)
    settle(trees, env)
    contents = {(t / "notes.md").read_text() for t in trees}
    assert len(contents) == 1 and contents <= {"from a\n", "from the last\n"}
    assert all(conflicts(t, env) == [] for t in trees)

    listing = json.loads(cli("group", "list", "-m", a, "--json", env=env).stdout)
    assert len(listing["peers"]) == members - 1
    assert all(p["pending_in"] == 0 and p["pending_out"] == 0 for p in listing["peers"]), [(p["pending_in"], p["pending_out"], p["events"]) for p in listing["peers"]]
    return trees


def test_three_members_file_store(tmp_path):
    run_group(tmp_path, f"file://{tmp_path}/store")


def test_two_members_encrypted_file_store(tmp_path, monkeypatch):
    monkeypatch.setenv("DELTAFS_KDF_PARAMS", "1,64,1")
    env = dict(os.environ, DELTAFS_PASSPHRASE="correct horse", DELTAFS_KDF_PARAMS="1,64,1")
    run_group(tmp_path, f"file://{tmp_path}/store", env=env, members=2, join_extra=("--encrypt",))
    store = tmp_path / "store"
    names = [str(p.relative_to(store)) for p in store.rglob("*") if p.is_file()]
    assert "deltafs-key.json" in names and all(n.startswith("o/") or n == "deltafs-key.json" for n in names)
    assert not any(b"from a" in p.read_bytes() for p in store.rglob("*") if p.is_file())


@pytest.mark.timeout(300)
def test_three_members_seaweedfs(tmp_path, s3_env):
    env = dict(os.environ)
    run_group(tmp_path, f"s3://{BUCKET}/group-{tmp_path.name}", env=env,
              extra=("--endpoint-url", s3_env.endpoint_url))


def test_bad_input(tmp_path):
    a = new_tree(tmp_path / "a", {"f": "1"})
    res = cli("group", "sync", "-m", a, ok=False)
    assert res.returncode == 2 and "in no sync group" in res.stderr and "Traceback" not in res.stderr
    res = cli("group", "join", "ftp://x/y", "-m", a, ok=False)
    assert res.returncode == 2 and res.stderr.count("\n") == 1
    cli("group", "join", f"file://{tmp_path}/store", "-m", a)
    res = cli("group", "join", f"file://{tmp_path}/store", "-m", a, ok=False)
    assert res.returncode == 2 and "already a member" in res.stderr
    res = cli("resolve", "f", "--take", "remote", "-m", a, ok=False)
    assert res.returncode == 2 and "no open conflict" in res.stderr
    res = cli("resolve", "--take", "what", "--all", "-m", a, ok=False)
    assert res.returncode == 2 and "--take" in res.stderr
    res = cli("clone", f"file://{tmp_path}/store", tmp_path / "a", "--join", ok=False)
    assert res.returncode == 2 and "not an empty directory" in res.stderr
    cli("group", "leave", "-m", a)
    assert cli("group", "list", "-m", a, ok=False).returncode == 2
    # a plain clone of a group store: the merged tree, no new member
    cli("clone", f"file://{tmp_path}/store", tmp_path / "c")
    assert (tmp_path / "c" / "f").read_text() == "1"
    assert len(sync.store.list_members(sync.open_store(f"file://{tmp_path}/store", str(tmp_path / "c" / ".deltafs")))) == 1


def test_crash_mid_apply_is_finished_once(tmp_path):
    """An apply that changed SRC but crashed before journaling: the next pass finishes it, once."""
    url = f"file://{tmp_path}/store"
    a = new_tree(tmp_path / "a", {"f.txt": "v1\n"})
    b = tmp_path / "b"
    cli("group", "join", url, "-m", a)
    cli("clone", url, b, "--join")
    (a / "f.txt").write_text("v2\n")
    cli("group", "sync", "-m", a)

    class Crash(Exception):
        pass

    with Journal.open(b / ".deltafs") as j:
        st = S.load(j.path)
        eng = sync.Engine(j, str(b), sync.open_store(url, j.path), st, sync.LocalIO(j, str(b)))
        real = eng.io.record

        def crash(paths):
            raise Crash  # SRC is written, the journal has not heard of it

        eng.io.record = crash
        with pytest.raises(Crash):
            eng.run_pass()
        assert (b / "f.txt").read_text() == "v2\n"
        assert S.load(j.path).intents  # the intent survived the crash
        eng.io.record = real
    with Journal.open(b / ".deltafs") as j, j.reader() as r:
        before = sum(1 for rec in r.records() if rec.is_content)
    rep = json.loads(cli("group", "sync", "-m", b, "--json").stdout)
    assert rep["published"] == 0  # finishing the apply is not a local change
    with Journal.open(b / ".deltafs") as j:
        st = S.load(j.path)
        assert not st.intents and not st.pending and not st.conflicts
        with j.reader() as r:
            contents = [r.read_content(rec.seq) for rec in r.records() if rec.is_content]
    assert contents.count(b"v2\n") == 1 and len(contents) <= before + 1
    a_dev = json.loads(cli("group", "list", "-m", a, "--json").stdout)["device"]
    top = json.loads(cli("log", "f.txt", "--journal", b / ".deltafs", "--json", "-n", "1").stdout.splitlines()[0])
    assert top["cause"] == "sync" and top["origin"].startswith(a_dev + ":"), top  # not "scan"
    cli("group", "sync", "-m", a)
    assert conflicts(a) == [] and (a / "f.txt").read_text() == "v2\n"


def test_guard_holds_a_damaging_peer_until_resume(tmp_path):
    """A peer whose changes look like mass damage (text files turned to random bytes) is held,
    not applied, until `deltafs guard resume`; ordinary edits before it went through."""
    url = f"file://{tmp_path}/store"
    files = {f"doc{i}.txt": ("a normal line of text, written by hand\n" * 60) for i in range(8)}
    a = new_tree(tmp_path / "a", files)
    b = tmp_path / "b"
    cli("group", "join", url, "-m", a)
    cli("clone", url, b, "--join")
    (a / "doc0.txt").write_text("an ordinary edit\n" * 40)
    cli("group", "sync", "-m", a)
    cli("group", "sync", "-m", b)
    assert (b / "doc0.txt").read_text() == "an ordinary edit\n" * 40  # no alert for that
    for name in files:
        (a / name).write_bytes(os.urandom(4096))
    cli("group", "sync", "-m", a)
    rep = json.loads(cli("group", "sync", "-m", b, "--json").stdout)
    assert rep["held"] == 1 and rep["applied"] == 0, rep
    assert all((b / n).read_bytes()[:5] in (b"a nor", b"an or") for n in files)  # nothing applied
    peer = json.loads(cli("group", "list", "-m", b, "--json").stdout)["peers"][0]
    assert peer["held"] and peer["held"]["files"] >= 5 and peer["pending_in"] > 0, peer
    assert json.loads(cli("group", "sync", "-m", b, "--json").stdout)["applied"] == 0  # still held
    res = cli("status", b, "--check", ok=False)  # a held peer fails the check, in one clear line
    assert res.returncode == 1 and len(res.stdout.splitlines()) == 1, res.stdout
    assert "held by the damage guard" in res.stdout and "deltafs guard resume" in res.stdout, res.stdout
    assert "deltafs_sync_peer_held{" in cli("status", b, "--prometheus").stdout
    out = cli("guard", "resume", b).stdout
    assert "released" in out
    rep = json.loads(cli("group", "sync", "-m", b, "--json").stdout)
    assert rep["applied"] == len(files) and rep["held"] == 0, rep
    assert all((b / n).read_bytes() == (a / n).read_bytes() for n in files)
    assert json.loads(cli("group", "list", "-m", b, "--json").stdout)["peers"][0]["held"] is None
    assert cli("status", b, "--check").stdout.startswith("OK")


def test_status_check_fails_on_a_peer_unheard_too_long(tmp_path):
    """`status --check --max-peer-age S`: a peer whose stream has not moved for longer than S
    (by this machine's clock) fails the check; hearing from it again clears it."""
    url = f"file://{tmp_path}/store"
    a = new_tree(tmp_path / "a", {"f.txt": "1\n"})
    b = tmp_path / "b"
    cli("group", "join", url, "-m", a)
    cli("clone", url, b, "--join")
    cli("group", "sync", "-m", a)
    assert cli("status", a, "--check", "--max-peer-age", "3600").stdout.startswith("OK")
    st = S.load(str(a / ".deltafs"))  # a last heard from b two hours ago
    (peer,) = st.peers.values()
    peer["heard_ns"] -= 7200 * 10**9
    S.save(str(a / ".deltafs"), st)
    assert cli("status", a, "--check").stdout.startswith("OK")  # not checked without --max-peer-age
    res = cli("status", a, "--check", "--max-peer-age", "3600", ok=False)
    assert res.returncode == 1 and len(res.stdout.splitlines()) == 1, res.stdout
    assert "last heard 2h00m ago" in res.stdout and b.name not in ("",), res.stdout
    cli("group", "sync", "-m", a)  # b's stream has not moved: still unheard
    assert cli("status", a, "--check", "--max-peer-age", "3600", ok=False).returncode == 1
    (b / "f.txt").write_text("2\n")
    cli("group", "sync", "-m", b)
    cli("group", "sync", "-m", a)
    assert cli("status", a, "--check", "--max-peer-age", "3600").stdout.startswith("OK")


def test_resolve_merge(tmp_path):
    """resolve --merge: a three-way merge from the common ancestor ends a conflict of separate
    edits; overlapping edits leave conflict markers in the file and the conflict open."""
    url = f"file://{tmp_path}/store"
    lines = [f"line {i}\n" for i in range(10)]
    a = new_tree(tmp_path / "a", {"notes.md": "".join(lines)})
    b = tmp_path / "b"
    cli("group", "join", url, "-m", a)
    cli("clone", url, b, "--join")
    (a / "notes.md").write_text("".join(["line 0, edited on a\n", *lines[1:]]))
    (b / "notes.md").write_text("".join([*lines[:8], "line 8, edited on b\n", lines[9]]))
    settle([a, b])
    assert len(conflict_set(a)) == 1 and conflict_set(a) == conflict_set(b)
    out = cli("resolve", "notes.md", "--merge", "-m", b).stdout
    assert "merged" in out, out
    both = "".join(["line 0, edited on a\n", *lines[1:8], "line 8, edited on b\n", lines[9]])
    assert (b / "notes.md").read_text() == both
    settle([a, b])
    assert (a / "notes.md").read_text() == both and conflicts(a) == [] and conflicts(b) == []
    b_dev = json.loads(cli("group", "list", "-m", b, "--json").stdout)["device"]
    top = json.loads(cli("log", "notes.md", "--journal", b / ".deltafs", "--json", "-n", "1").stdout.splitlines()[0])
    assert top["cause"] == "sync" and top["origin"].startswith(b_dev + ":"), top  # b's resolve event

    # both change line 3: markers, the conflict stays open, until resolved by hand
    (a / "notes.md").write_text(both.replace("line 3\n", "line 3 by a\n"))
    (b / "notes.md").write_text(both.replace("line 3\n", "line 3 by b\n"))
    settle([a, b])
    res = cli("resolve", "notes.md", "--merge", "-m", b, ok=False)
    assert res.returncode == 1 and res.stderr.count("\n") == 1 and "conflict markers" in res.stderr, res.stderr
    text = (b / "notes.md").read_text()
    assert "<<<<<<< local\nline 3 by b\n" in text and ">>>>>>> " in text and "line 3 by a\n" in text, text
    settle([a, b])
    assert len(conflict_set(a)) == 1 and conflict_set(a) == conflict_set(b)  # still open, the same on both
    (b / "notes.md").write_text(both.replace("line 3\n", "line 3 by a and b\n"))
    cli("resolve", "notes.md", "--take", "local", "-m", b)
    settle([a, b])
    assert (a / "notes.md").read_text() == (b / "notes.md").read_text() == both.replace("line 3\n", "line 3 by a and b\n")
    assert conflicts(a) == [] and conflicts(b) == []
    res = cli("resolve", "notes.md", "--merge", "--take", "local", "-m", b, ok=False)
    assert res.returncode == 2 and "--merge" in res.stderr


def test_conflict_copies(tmp_path):
    """group join --conflict-copies: on that member, a conflict's remote version is also a file
    NAME.conflict-DEVICE-N.EXT beside it (journaled as a sync); copies are never published."""
    url = f"file://{tmp_path}/store"
    a = new_tree(tmp_path / "a", {"notes.md": "one\n", "Makefile": "all:\n"})
    b = tmp_path / "b"
    cli("group", "join", url, "-m", a, "--conflict-copies")
    cli("clone", url, b, "--join")
    (a / "notes.md").write_text("from a\n")
    (b / "notes.md").write_text("from b\n")
    (a / "Makefile").write_text("all: a\n")
    (b / "Makefile").write_text("all: b\n")
    settle([a, b])
    version = next(x for x in conflicts(a) if x["path"] == "notes.md")["remote"][0]["version"]
    dev, n = version.split(":")
    copy = a / f"notes.conflict-{dev}-{n}.md"
    assert copy.read_text() == "from b\n" and (a / "notes.md").read_text() == "from a\n"
    mk = [x for x in os.listdir(a) if x.startswith("Makefile.conflict-")]
    assert len(mk) == 1 and (a / mk[0]).read_text() == "all: b\n", mk
    assert sorted(os.listdir(b)) == [".deltafs", "Makefile", "notes.md"]  # b did not ask for copies
    assert conflict_set(a) == conflict_set(b) and len(conflict_set(a)) == 2
    top = json.loads(cli("log", copy.name, "--journal", a / ".deltafs", "--json", "-n", "1").stdout.splitlines()[0])
    assert top["cause"] == "sync" and top["origin"] == version, top
    copy.unlink()  # deleting a copy is not a change the group sees
    settle([a, b])
    a_dev = json.loads(cli("group", "list", "-m", a, "--json").stdout)["device"]
    store = sync.open_store(url, str(a / ".deltafs"))
    head = sync.store.read_head(store, a_dev)
    evs, prev = [], bytes(32)
    for seg in head.segments:
        got, prev = sync.store.decode_segment(store.get(seg["name"]), seg["name"], url, a_dev, seg["first"],
                                              seg["last"], prev)
        evs.extend(got)
    assert not any(b".conflict-" in e["p"] for e in evs), [e["p"] for e in evs]
    assert not copy.exists() and sorted(os.listdir(b)) == [".deltafs", "Makefile", "notes.md"]
    cli("resolve", "--all", "--take", "local", "-m", a)
    settle([a, b])
    assert conflicts(a) == [] and conflicts(b) == [] and (b / "notes.md").read_text() == "from a\n"


def test_every_save_between_two_passes_is_a_version_everywhere(tmp_path):
    """Three saves of one file (and one of another) between two passes of a: b's journal gets
    each of them as a version of its own (cause sync, in order), not only the last."""
    url = f"file://{tmp_path}/store"
    a = new_tree(tmp_path / "a", {"f.txt": "v0\n"})
    b = tmp_path / "b"
    cli("group", "join", url, "-m", a)
    cli("clone", url, b, "--join")
    with Journal.open(a / ".deltafs") as j:
        io = sync.LocalIO(j, str(a), cause="save")
        for i in (1, 2, 3):
            (a / "f.txt").write_text(f"v{i}\n")
            io.record([b"f.txt"])
        (a / "g.txt").write_text("g\n")
        io.record([b"g.txt"])
    settle([a, b])
    with Journal.open(b / ".deltafs", readonly=True) as j, j.reader() as r:
        got = [(r.read_content(rec.seq), rec.cause) for rec in r.records() if rec.is_content and rec.path == b"f.txt"]
    assert [c for c, _ in got] == [b"v0\n", b"v1\n", b"v2\n", b"v3\n"], got
    assert all(cause == "sync" for _, cause in got[1:]), got
    assert (b / "f.txt").read_text() == "v3\n" and (b / "g.txt").read_text() == "g\n"
    assert conflicts(a) == [] and conflicts(b) == []
    (b / "f.txt").write_text("v4 from b\n")  # and b's next save is sequential, not a conflict
    settle([a, b])
    assert (a / "f.txt").read_text() == "v4 from b\n" and conflicts(a) == [] and conflicts(b) == []


def test_resolve_all_merge_goes_on_past_an_unclean_path(tmp_path):
    """resolve --all --merge: a path whose changes overlap does not stop the others; each
    unclean path is one line on stderr, the clean ones are merged and published, exit 1."""
    url = f"file://{tmp_path}/store"
    lines = "".join(f"line {i}\n" for i in range(10))
    names = ("a_clean.md", "b_clash.md", "c_clash.md", "d_clean.md")
    a = new_tree(tmp_path / "a", {n: lines for n in names})
    b = tmp_path / "b"
    cli("group", "join", url, "-m", a)
    cli("clone", url, b, "--join")
    for n in names:
        (a / n).write_text(lines.replace("line 1\n", f"line 1 of {n} by a\n"))
        other = "line 1\n" if "clash" in n else "line 8\n"
        (b / n).write_text(lines.replace(other, f"{other.strip()} of {n} by b\n"))
    settle([a, b])
    assert {c["path"] for c in conflicts(b)} == set(names)
    res = cli("resolve", "--all", "--merge", "-m", b, ok=False)
    assert res.returncode == 1, (res.stdout, res.stderr)
    err = res.stderr.splitlines()
    assert len(err) == 2 and err[0].startswith("deltafs: b_clash.md: ") and err[1].startswith("deltafs: c_clash.md: ") \
        and all("conflict markers" in e for e in err), err
    assert sorted(line.split(":")[0] for line in res.stdout.splitlines()) == ["a_clean.md", "d_clean.md"], res.stdout
    settle([a, b])
    for n in ("a_clean.md", "d_clean.md"):
        both = lines.replace("line 1\n", f"line 1 of {n} by a\n").replace("line 8\n", f"line 8 of {n} by b\n")
        assert (a / n).read_text() == (b / n).read_text() == both
    assert {c["path"] for c in conflicts(a)} == {c["path"] for c in conflicts(b)} == {"b_clash.md", "c_clash.md"}
    assert "<<<<<<< local" in (b / "c_clash.md").read_text()
    # --json: one object per path, the unclean ones with their error
    rows = [json.loads(x) for x in cli("resolve", "--all", "--merge", "-m", b, "--json", ok=False).stdout.splitlines()]
    assert sorted(r["path"] for r in rows) == ["b_clash.md", "c_clash.md"] and all("error" in r for r in rows), rows


def _objects(url: str, journal: Path, prefix: str) -> set[str]:
    with sync.open_store(url, str(journal)) as store:
        return {n for n, _ in store.list(prefix)}


def test_a_crash_before_the_head_leaves_no_orphans_after_the_next_publish(tmp_path):
    """kill -9 of `group sync` after its pack, or after its segment, before its head.json: the
    next publish of that member removes the objects no head names, its own only."""
    url = f"file://{tmp_path}/store"
    a = new_tree(tmp_path / "a", {"f.txt": "v0\n"})
    b = tmp_path / "b"
    cli("group", "join", url, "-m", a)
    cli("clone", url, b, "--join")
    devs = {t: json.loads(cli("group", "list", "-m", t, "--json").stdout)["device"] for t in (a, b)}
    # an object under a's prefix that no head names: b never removes a peer's
    with sync.open_store(url, str(a / ".deltafs")) as store:
        store.put(f"members/{devs[a]}/events/{'f' * 16}-{'f' * 16}.seg", b"not b's")
    for point in ("after-pack", "after-segment"):
        (b / "f.txt").write_text(os.urandom(4096).hex() + point)
        res = cli("group", "sync", "-m", b, env={**os.environ, "DELTAFS_TEST_SYNC_KILL": point}, ok=False)
        assert res.returncode == -9, (res.returncode, res.stderr)
        (b / "f.txt").write_text(os.urandom(4096).hex() + point + " again")  # the next publish differs
        before = _objects(url, b / ".deltafs", f"members/{devs[b]}/")
        rep = json.loads(cli("group", "sync", "-m", b, "--json").stdout)
        head = sync.store.read_head(sync.open_store(url, str(b / ".deltafs")), devs[b])
        named = {s["name"] for s in head.segments} | set(head.packs)
        after = _objects(url, b / ".deltafs", f"members/{devs[b]}/")
        assert after == named, (point, sorted(after - named))
        assert before - named and rep.get("orphans_removed") == len(before - named), (point, rep)
    assert f"members/{devs[a]}/events/{'f' * 16}-{'f' * 16}.seg" in _objects(url, a / ".deltafs", "members/")
    settle([a, b])
    assert (a / "f.txt").read_text() == (b / "f.txt").read_text() and conflicts(a) == [] == conflicts(b)


def test_every_save_of_a_conflicted_path_is_a_version(tmp_path):
    """Two saves of a path in conflict between two passes of a: each is an event of a's stream,
    so c, which holds a's side, journals each as a version; b keeps one head (a's newest)."""
    url = f"file://{tmp_path}/store"
    a = new_tree(tmp_path / "a", {"f.txt": "v0\n"})
    b, c = tmp_path / "b", tmp_path / "c"
    cli("group", "join", url, "-m", a)
    cli("clone", url, b, "--join")
    cli("clone", url, c, "--join")
    (a / "f.txt").write_text("a1\n")
    cli("group", "sync", "-m", a)
    cli("group", "sync", "-m", c)  # c takes a's side
    (b / "f.txt").write_text("b1\n")
    settle([b, a, c])
    assert len(conflict_set(a)) == 1 and conflict_set(a) == conflict_set(b) == conflict_set(c)
    assert (c / "f.txt").read_text() == "a1\n"
    with Journal.open(a / ".deltafs") as j:
        io = sync.LocalIO(j, str(a), cause="save")
        for i in (2, 3):
            (a / "f.txt").write_text(f"a{i}\n")
            io.record([b"f.txt"])
    settle([a, b, c])
    with Journal.open(c / ".deltafs", readonly=True) as j, j.reader() as r:
        got = [r.read_content(rec.seq) for rec in r.records() if rec.is_content and rec.path == b"f.txt"]
    assert got[-3:] == [b"a1\n", b"a2\n", b"a3\n"], got
    assert (c / "f.txt").read_text() == "a3\n" and (b / "f.txt").read_text() == "b1\n"
    sets = [conflict_set(t) for t in (a, b, c)]
    assert len(sets[0]) == 1 and all(s == sets[0] for s in sets), sets
    (remote,) = conflicts(b)[0]["remote"]
    assert remote["size"] == 3 and remote["version"] == conflicts(c)[0]["local"]["version"]
    cli("resolve", "f.txt", "--take", "remote", "-m", b)
    settle([a, b, c])
    assert {(t / "f.txt").read_text() for t in (a, b, c)} == {"a3\n"}
    assert all(conflicts(t) == [] for t in (a, b, c))


def test_case_only_and_directory_renames_are_synced(tmp_path):
    """a -> A (only the case changes), of a file and of a directory, and a directory renamed:
    every member ends with the new names holding the bytes, and no old name (a directory's
    delete is applied after its children's, so it is empty by then)."""
    url = f"file://{tmp_path}/store"
    a = new_tree(tmp_path / "a", {"notes.md": "one\n", "dir/x.txt": "x\n", "old/sub/y.txt": "y\n"})
    b = tmp_path / "b"
    cli("group", "join", url, "-m", a)
    cli("clone", url, b, "--join")
    os.rename(a / "notes.md", a / "NOTES.md")
    os.rename(a / "dir", a / "Dir")
    os.rename(a / "old", a / "new")
    settle([a, b])
    for t in (a, b):
        assert sorted(os.listdir(t)) == [".deltafs", "Dir", "NOTES.md", "new"], (t, os.listdir(t))
        assert (t / "NOTES.md").read_text() == "one\n" and os.listdir(t / "Dir") == ["x.txt"]
        assert (t / "new" / "sub" / "y.txt").read_text() == "y\n"
    assert conflicts(a) == [] == conflicts(b)
    os.rename(b / "NOTES.md", b / "notes.md")  # and back, from the other side
    settle([a, b])
    assert sorted(os.listdir(a)) == [".deltafs", "Dir", "new", "notes.md"] and (a / "notes.md").read_text() == "one\n"


def test_pass_report_counts_conflicted_files_not_events(tmp_path):
    """a saves a file twice between passes while b changed it too: b's pass meets two of a's
    events on that one file, and its report says one conflict (a file), not two."""
    url = f"file://{tmp_path}/store"
    a = new_tree(tmp_path / "a", {"f.txt": "v0\n", "g.txt": "g0\n"})
    b = tmp_path / "b"
    cli("group", "join", url, "-m", a)
    cli("clone", url, b, "--join")
    with Journal.open(a / ".deltafs") as j:
        io = sync.LocalIO(j, str(a), cause="save")
        for i in (1, 2):
            (a / "f.txt").write_text(f"a{i}\n")
            io.record([b"f.txt"])
    cli("group", "sync", "-m", a)
    (b / "f.txt").write_text("b1\n")
    (b / "g.txt").write_text("b-g\n")  # (b's own change elsewhere: no conflict)
    rep = json.loads(cli("group", "sync", "-m", b, "--json").stdout)
    assert rep["received"] >= 2 and rep["conflicts"] == 1 and rep["open_conflicts"] == 1, rep
