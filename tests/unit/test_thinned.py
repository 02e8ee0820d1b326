"""Honest restores of thinned history: after the default burst coalescing,
a moment whose versions were coalesced away gives each file its latest
retained version before, says so once on stderr with a count, exits 1
(unless --nearest) and lists the files in --json; a corrupt file as well
makes it exit 3.  Everywhere: restore, cat --at, diff, clone --at."""

from __future__ import annotations

import json
import os

import pytest

from deltafs import cli
from deltafs.journal import Journal

from test_history import Builder
from test_journal import corrupt_chunk


@pytest.fixture
def thinned(tmp_path):
    """a and c saved three times, the last two 5 s apart; b twice; then quiet
    for minutes, and `deltafs compact` (default policy: bursts of saves within
    10 s keep their last once older than a minute) prunes a's and c's
    middle versions.  -> (journal, the moment right after c's middle save,
    content of every version, {path: [seqs]})"""
    b = Builder(tmp_path / "j")
    t0 = b.clock.ns
    seqs: dict[str, list[int]] = {"a": [], "b": [], "c": []}
    for t, name in ((0, "a"), (5, "b"), (10, "c"), (40, "a"), (42, "c"), (45, "b"), (48, "a"), (50, "c")):
        b.clock.ns = t0 + t * 10**9
        seqs[name].append(b.write(name.encode(), f"{name} saved at {t}s\n".encode() * 100))
    b.clock.ns = t0 + 400 * 10**9
    b.write(b"later", b"much later\n")
    moment = seqs["c"][1]
    content = dict(b.content)
    b.close()
    jdir = tmp_path / "j"
    rc = cli.main(["compact", "--journal", str(jdir), "--json"])
    assert rc == 0
    return jdir, moment, content, seqs


def run(capsys, *args) -> tuple[int, str, str]:
    rc = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_default_coalescing_thins_and_every_tool_says_so(thinned, capsys, tmp_path):
    jdir, moment, content, seqs = thinned
    capsys.readouterr()
    a, b, c = seqs["a"], seqs["b"], seqs["c"]
    with Journal.open(jdir, readonly=True) as j:
        with j.reader() as r:
            assert r.pruned_seqs() == {a[1], c[1]}  # the bursts' first saves

    # a tree restore at that moment: a and c at their first versions, b as it was
    dest = tmp_path / "t1"
    rc, out, err = run(capsys, "restore", "--journal", jdir, "/", "--version", moment, "--to", dest, "--json")
    assert rc == 1
    rep = json.loads(out)
    assert sorted(rep["thinned"], key=lambda d: d["path"]) == [
        {"path": "a", "asked": a[1], "given": a[0]}, {"path": "c", "asked": c[1], "given": c[0]}]
    assert rep["errors"] == [] and rep["failed"] == []
    assert err == ("deltafs: note: 2 files restored at an earlier version than asked: retention pruned the "
                   "versions they had then, so the latest retained version before each was used (--json "
                   "lists them); exit status 1 (--nearest accepts this)\n")
    assert (dest / "a").read_bytes() == content[a[0]] and (dest / "c").read_bytes() == content[c[0]]
    assert (dest / "b").read_bytes() == content[b[0]]
    rc, out, err = run(capsys, "restore", "--journal", jdir, "/", "--version", moment, "--to", tmp_path / "t2",
                       "--nearest")
    assert rc == 0 and err.count("\n") == 1 and "2 files restored" in err and "exit status" not in err
    assert "2 at an earlier retained version" in out

    # cat --at, and a diff whose side was thinned
    rc, out, err = run(capsys, "cat", "--journal", jdir, "c", "--version", moment)
    assert rc == 1 and out == content[c[0]].decode()
    assert err.startswith(f"deltafs: note: c given at version {c[0]} instead of {c[1]}")
    rc, out, err = run(capsys, "diff", "--journal", jdir, "a", a[0], moment, "--json")
    d = json.loads(out)
    assert rc == 1 and d["identical"] and d["thinned"] == [{"path": "a", "asked": a[1], "given": a[0],
                                                            "side": "to"}]
    assert f"a compared at version {a[0]} instead of {a[1]}" in err
    assert run(capsys, "diff", "--journal", jdir, "a", a[0], moment, "--nearest")[0] == 0

    # a corrupt file as well: exit 3 wins, the rest still restored and listed
    with Journal.open(jdir, readonly=True) as j, j.reader() as r:
        cid = r.chunk_list(b[0])[0][0]
    corrupt_chunk(jdir, cid)
    dest = tmp_path / "t3"
    rc, out, err = run(capsys, "restore", "--journal", jdir, "/", "--version", moment, "--to", dest, "--json")
    assert rc == 3
    rep = json.loads(out)
    assert [f["path"] for f in rep["failed"]] == ["b"] and len(rep["thinned"]) == 2
    assert err.count("\n") == 2 and "b (version" in err and "2 files restored" in err
    assert (dest / "a").read_bytes() == content[a[0]] and not (dest / "b").exists()


def test_clone_at_a_thinned_moment_says_so(thinned, capsys, tmp_path):
    jdir, moment, content, seqs = thinned
    mirror = f"file://{tmp_path / 'mirror'}"
    assert run(capsys, "mirror", "sync", mirror, "--journal", jdir)[0] == 0
    rc, out, err = run(capsys, "clone", mirror, tmp_path / "clone", "--at", moment, "--json")
    assert rc == 1, err
    assert len(json.loads(out)["restore"]["thinned"]) == 2 and "2 files restored" in err
    assert (tmp_path / "clone" / "a").read_bytes() == content[seqs["a"][0]]
    rc, out, err = run(capsys, "clone", mirror, tmp_path / "clone2", "--at", moment, "--nearest")
    assert rc == 0 and (tmp_path / "clone2" / "c").read_bytes() == content[seqs["c"][0]]
    assert os.path.isdir(tmp_path / "clone2" / ".deltafs")
