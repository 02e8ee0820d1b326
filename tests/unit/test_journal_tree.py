"""tree_at and the live indexes after renames, unlinks, links, exchanges."""

from __future__ import annotations

import pytest

from deltafs.journal import KIND_DIR, KIND_FILE, KIND_SYMLINK, RENAME_EXCHANGE, Change, Journal

from test_journal import FakeClock, version


@pytest.fixture
def journal(tmp_path):
    j = Journal.open(tmp_path / "j", create=True, clock=FakeClock())
    yield j
    j.close()


def _live(r):
    return {p: (fid, kind) for p, fid, kind in r.current_tree()}


def test_tree_at_after_renames_unlinks_links(journal):
    j = journal
    s_mk = j.commit([
        Change(op="mkdir", file_id=1, path=b"docs", mode=0o40755),
        Change(op="mkdir", file_id=2, path=b"docs/sub", mode=0o40755),
        Change(op="create", file_id=3, path=b"docs/sub/a.txt", mode=0o100644),
    ])[-1]
    s_a = j.commit([version(j, 3, b"docs/sub/a.txt", b"hello a")])[0]
    j.commit([Change(op="link", file_id=3, path=b"docs/sub/a.txt", path2=b"hard")])
    s_sym = j.commit([Change(op="symlink", file_id=4, path=b"ln", target=b"docs/sub/a.txt")])[0]
    s_ren = j.commit([Change(op="rename", file_id=1, path=b"docs", path2=b"papers")])[0]
    # editor save: write temp, rename over the target
    j.commit([Change(op="create", file_id=5, path=b"papers/sub/.a.swp")])
    s_b = j.commit([version(j, 5, b"papers/sub/.a.swp", b"hello b")])[0]
    s_over = j.commit([Change(op="rename", file_id=5, path=b"papers/sub/.a.swp", path2=b"papers/sub/a.txt")])[0]
    s_un = j.commit([Change(op="unlink", file_id=3, path=b"hard")])[0]

    with j.reader() as r:
        t = r.tree_at(s_mk)
        assert set(t) == {b"docs", b"docs/sub", b"docs/sub/a.txt"}
        assert t[b"docs"].kind == KIND_DIR and t[b"docs/sub/a.txt"].kind == KIND_FILE

        t = r.tree_at(s_sym)
        assert t[b"hard"].file_id == 3 and t[b"hard"].link_group == 3
        assert t[b"docs/sub/a.txt"].content_seq == s_a
        assert t[b"ln"].kind == KIND_SYMLINK and t[b"ln"].target == b"docs/sub/a.txt"

        t = r.tree_at(s_ren)
        assert b"docs" not in t and t[b"papers/sub/a.txt"].file_id == 3
        assert t[b"hard"].link_group == 3

        t = r.tree_at(s_over)
        assert t[b"papers/sub/a.txt"].file_id == 5 and t[b"papers/sub/a.txt"].content_seq == s_b
        assert b"papers/sub/.a.swp" not in t
        assert t[b"hard"].file_id == 3 and t[b"hard"].link_group is None  # one link left

        t = r.tree_at(s_un)
        assert b"hard" not in t
        assert r.file_state(3).deleted and r.file_state(3).content_seq == s_a
        assert r.read_content(s_a) == b"hello a"  # deleted files keep their history

        # the live index equals a replay of every record
        assert _live(r) == {p: (e.file_id, e.kind) for p, e in r.tree_at().items()}
        assert r.file_id_at(b"papers/sub/a.txt") == 5
        assert r.versions_of(3)[0] == s_un
        under = r.versions_under(b"papers")
        assert s_ren in under and s_b in under and s_a not in under
        assert s_a in r.versions_under(b"docs") and s_a not in r.versions_under(b"doc")
        assert r.tree_at(s_ren, prefix=b"papers/sub").keys() == {b"papers/sub", b"papers/sub/a.txt"}


def test_rename_exchange_and_long_paths(journal):
    j = journal
    long_dir = b"d" * 300 + b"/" + b"e" * 300
    j.commit([
        Change(op="mkdir", file_id=1, path=b"x"),
        Change(op="create", file_id=2, path=b"x/1"),
        Change(op="mkdir", file_id=3, path=b"y"),
        Change(op="create", file_id=4, path=b"y/2"),
        Change(op="rename", file_id=1, path=b"x", path2=b"y", flags=RENAME_EXCHANGE),
        Change(op="mkdir", file_id=5, path=b"d" * 300),
        Change(op="mkdir", file_id=6, path=long_dir),
        Change(op="create", file_id=7, path=long_dir + b"/f"),
        Change(op="rename", file_id=6, path=long_dir, path2=b"short"),
        Change(op="setattr", file_id=7, path=b"short/f", mode=0o100600, mtime_ns=5),
    ])
    with j.reader() as r:
        live = _live(r)
        assert live == {p: (e.file_id, e.kind) for p, e in r.tree_at().items()}
        assert live[b"y/1"][0] == 2 and live[b"x/2"][0] == 4 and live[b"y"][0] == 1
        assert live[b"short/f"][0] == 7 and long_dir + b"/f" not in live
        assert r.file_state(7).mode == 0o100600 and r.file_state(7).path == b"short/f"
        assert r.versions_under(long_dir)  # long paths are found too
