"""`deltafs log` groups a save's records into one entry (docs/cli.md "deltafs log")."""

from __future__ import annotations

import json

from deltafs import history

SEC = 10**9
T0 = 1_700_000_000 * SEC


def rec(seq, op, fid, path, t, path2=None, cause=None, size=None, stored=0):
    d = {"version": seq, "time": str(t), "time_ns": T0 + int(t * SEC), "op": op, "path": path,
         "file_id": fid}
    if path2 is not None:
        d["path2"] = path2
    if cause is not None:
        d.update(cause=cause, size=size or 0, stored=stored, base=0)
    return d


def vim_save(seq, t):
    """vim :w with a backup: rename the file away, write a new one, copy the
    mode and xattrs, drop the backup."""
    return [rec(seq, "rename", 1, "a.txt", t, path2="a.txt~"),
            rec(seq + 1, "create", 2, "a.txt", t + 0.01),
            rec(seq + 2, "write", 2, "a.txt", t + 0.02, cause="fsync", size=10, stored=10),
            rec(seq + 3, "setattr", 2, "a.txt", t + 0.03),
            rec(seq + 4, "setxattr", 2, "a.txt", t + 0.04),
            rec(seq + 5, "unlink", 1, "a.txt~", t + 0.05)]


def test_a_vim_save_is_one_entry_with_all_its_records():
    recs = vim_save(10, 0)
    (s,) = history.group_saves(recs)
    assert s["cause"] == "save" and s["path"] == "a.txt" and s["file_id"] == 2
    assert (s["first_version"], s["version"], s["size"], s["stored"]) == (10, 15, 10, 10)
    assert [d["version"] for d in s["records"]] == [15, 14, 13, 12, 11, 10]  # newest first, like log


def test_an_atomic_save_is_named_by_its_rename_onto_the_path():
    recs = [rec(1, "create", 5, ".a.txt.tmp", 0),
            rec(2, "write", 5, ".a.txt.tmp", 0.1, cause="write", size=3),
            rec(3, "rename", 5, ".a.txt.tmp", 0.2, path2="a.txt"),
            rec(4, "setattr", 5, "a.txt", 0.3)]
    (s,) = history.group_saves(recs)
    assert (s["cause"], s["path"], len(s["records"])) == ("atomic save", "a.txt", 4)


def test_time_gap_other_files_and_causes_split_saves():
    recs = [*vim_save(1, 0),
            *vim_save(7, 2.5),  # more than 2 s after the first save: a second save
            rec(13, "mkdir", 9, "d", 2.6),  # nothing in common: its own entry, named by its op
            rec(14, "write", 3, "b", 2.7, cause="scan", size=1),
            rec(15, "write", 4, "c", 2.7, cause="restore", size=1)]
    saves = history.group_saves(recs)
    assert [(s["cause"], s["first_version"], s["version"]) for s in saves] == [
        ("save", 1, 6), ("save", 7, 12), ("mkdir", 13, 13), ("scan", 14, 14), ("restore", 15, 15)]


def test_save_entries_reads_newest_first_and_never_splits_a_save():
    recs = [*vim_save(1, 0), *vim_save(7, 10), *vim_save(13, 10.5)]
    newest_first = recs[::-1]
    saves = list(history.save_entries(iter(newest_first)))
    # 7-12 and 13-18 are within 2 s and share the file's path, but each holds a content
    # version: two saves (two quick :w in a row are two versions; log hides neither)
    assert [(s["first_version"], s["version"]) for s in saves] == [(13, 18), (7, 12), (1, 6)]
    assert list(history.save_entries(iter(()))) == []
    # every record is in exactly one save
    assert sorted(d["version"] for s in saves for d in s["records"]) == list(range(1, 19))


def test_cli_lists_saves_by_default_and_records_on_request(tmp_path, capsys):
    from test_history import Builder, jdir, rcli

    b = Builder(tmp_path / "j")
    try:
        b.write(b"a", b"one")  # create + write, 1 s apart: one save
        b.tick(10)
        b.write(b"a", b"two")  # a second save
        b.write(b"b", b"x")  # another file: its own save
        rc, out, err = rcli(capsys, "log", "--journal", jdir(b), "--json")
        assert rc == 0 and err == ""
        saves = [json.loads(x) for x in out.splitlines()]
        assert [(s["path"], s["cause"], len(s["records"])) for s in saves] == [
            ("b", "save", 2), ("a", "save", 1), ("a", "save", 2)]
        rc, out, _ = rcli(capsys, "log", "--journal", jdir(b), "-n", "2")
        assert [x.split("\t")[2] for x in out.splitlines()] == ["save", "save"]
        rc, out, _ = rcli(capsys, "log", "--journal", jdir(b), "--records", "--json")
        assert [json.loads(x)["op"] for x in out.splitlines()] == ["write", "create", "write", "write", "create"]
    finally:
        b.close()


def test_watch_groups_what_one_poll_returns(tmp_path):
    """`log --watch` (without --records) prints the saves of each poll's records."""
    from test_history import Builder

    b = Builder(tmp_path / "j")
    try:
        b.write(b"f", b"1")
        with b.j.reader() as r:
            head = r.head_seq()
        polls = []

        def sleep(_):
            polls.append(1)
            if len(polls) == 1:
                b.write(b"g", b"2")  # create + write of a new file: one save
            if len(polls) > 5:
                raise RuntimeError("follow did not stream the new records")

        batch = next(history.follow_batches(b.j, b"", head, sleep=sleep))
        assert [d["op"] for d in batch] == ["create", "write"]
        (s,) = history.group_saves(batch)
        assert (s["path"], s["cause"], [d["op"] for d in s["records"]]) == ("g", "save", ["write", "create"])
    finally:
        b.close()
