"""Journal format 10: four logical databases live inside others (docs/format.md,
"Named databases"), so a small journal needs fewer LMDB pages; an older
journal is upgraded once; an older deltafs cannot mistake it for an empty one."""

from __future__ import annotations

import lmdb
import msgpack
import pytest

from deltafs import maintenance as M
from deltafs.config import parse_retention
from deltafs.errors import JournalFormatError
from deltafs.journal import Change, Journal
from deltafs.journal import compact as JC
from deltafs.journal import schema as S
from deltafs.journal.state import FileState

from oldformat import downgrade_to_format_9
from test_journal import FakeClock
from test_packs import edits
from test_record_blocks import many_records

LONG = b"dir/" + b"x" * 600  # a hashed path key (docs/format.md, "Path keys")
FORMAT_10_DBS = {b"changes", b"files", b"history", b"chunks", b"snapshots", b"mirrors",  # format 12: no checkpoints
                 b"trees", b"pruned", b"graveyard", b"plan"}


def named_dbs(jp) -> set[bytes]:
    env = lmdb.open(str(jp), max_dbs=S.MAX_DBS, readonly=True)
    out = set()
    try:
        with env.begin() as txn:
            keys = [bytes(k) for k in txn.cursor().iternext(values=False)]
        for k in keys:
            try:
                env.open_db(k, create=False)
            except (lmdb.IncompatibleError, lmdb.NotFoundError):  # a meta key, not a database's name
                continue
            out.add(k)
    finally:
        env.close()
    return out


def small_history(j: Journal) -> tuple[list[int], dict[int, bytes]]:
    seqs, content = edits(j, 8)
    many_records(j, 140)
    j.commit([Change(op="create", file_id=77, path=LONG, mode=0o100644)])
    j.commit([Change(op="link", file_id=77, path=LONG, path2=b"hard")])
    j.commit([Change(op="rename", file_id=77, path=LONG, path2=b"y")])
    j.commit([Change(op="symlink", file_id=78, path=b"ln", target=b"y")])
    j.commit([Change(op="unlink", file_id=78, path=b"ln")])
    return seqs, content


def snapshot_of(j: Journal, seqs) -> dict:
    with j.reader() as r:
        return {"head": r.head_seq(), "archived": r.archived_upto(), "raw": list(r.raw_records()),
                "tree": list(r.current_tree()), "files": {f: r.file_state(f) for f in (1, 7, 77, 78)},
                "history": {f: r.versions_of(f) for f in (1, 7, 77, 78)},
                "under": {p: r.versions_under(p) for p in (b"", b"f", b"d", b"dir", LONG, b"y", b"ln")},
                "content": {s: r.read_content(s) for s in seqs}, "stats": r.stats()["files"],
                "meta": {k: r.meta(k) for k in (S.META_JOURNAL_ID, S.META_HLC, S.META_STORED, S.META_RAW)}}


def test_a_format_10_journal_has_no_meta_paths_pathlog_or_record_blocks_database(tmp_path, monkeypatch):
    monkeypatch.setattr(JC, "RECORD_BLOCK_MAX", JC.RECORD_BLOCK)  # several blocks among the records
    jp = tmp_path / "j"
    with Journal.open(jp, create=True, clock=FakeClock()) as j:
        small_history(j)
        M.compact(j, parse_retention("*:all", burst=0))
        with j.reader() as r:
            assert r.archived_upto() >= 128 and len(list(r.record_blocks())) >= 4
            assert r.stats()["files"] == 4  # file ids, not the paths beside them
            assert [p for p, _, _ in r.current_tree()] == sorted([b"d", b"f", b"hard", b"y"])
            assert r.versions_under(b"dir") and r.versions_of(77)
        assert j.verify(full=True).ok
    assert named_dbs(jp) == FORMAT_10_DBS


def test_a_small_journal_takes_one_page_per_database_in_use(tmp_path):
    """The doc-like case of tools/bench/history_size: one file, a few hundred
    records, compacted.  Format 9 took a page each for meta, paths, pathlog and
    record_blocks on top of these."""
    jp = tmp_path / "j"
    with Journal.open(jp, create=True, clock=FakeClock()) as j:
        many_records(j, 100)
        edits(j, 40, size=40_000)
        M.compact(j, parse_retention("*:all", burst=0))
        st = j._storage
        with st.read() as txn:
            pages = {n: sum(txn.stat(st.dbs[n])[k] for k in ("branch_pages", "leaf_pages", "overflow_pages"))
                     for n in (S.DB_CHANGES, S.DB_FILES, S.DB_HISTORY)}  # checkpoints in changes (format 12)
        main = st.env.stat()
        assert main["branch_pages"] + main["leaf_pages"] == 1  # meta and the names of the databases
        assert pages == {S.DB_CHANGES: 1, S.DB_FILES: 1, S.DB_HISTORY: 1}, pages
        with j.reader() as r:
            assert len(list(r.checkpoints())) >= 1  # on the one page of changes
        with j.reader() as r:
            assert r.archived_upto() >= 128 and r.versions_under(b"f") and r.versions_under(b"d")


def test_a_format_9_journal_is_upgraded_once_and_reads_the_same(tmp_path):
    jp = tmp_path / "j"
    with Journal.open(jp, create=True, clock=FakeClock()) as j:
        seqs, _ = small_history(j)
        j.archive_records()
        before = snapshot_of(j, seqs)
    assert before["archived"] >= 128
    downgrade_to_format_9(jp)
    assert {S.DB_META, S.DB_PATHS, S.DB_PATHLOG, S.DB_RECORD_BLOCKS} <= named_dbs(jp)
    with pytest.raises(JournalFormatError, match="format version 9.*open it once for writing"):
        Journal.open(jp, readonly=True)
    with Journal.open(jp, clock=FakeClock()) as j:
        assert j.format_version == S.FORMAT_VERSION == 13
        assert snapshot_of(j, seqs) == before
        assert j.verify(full=True).ok
        more, more_content = edits(j, 2, fid=11)  # and it goes on: new records, blocks, paths
        many_records(j, 40)
        j.archive_records()
        with j.reader() as r:
            assert r.read_content(more[-1]) == more_content[more[-1]]
            assert r.versions_under(b"f")[:2] == more[::-1]
            assert r.stats()["files"] == before["stats"] + 1
            assert r.archived_upto() > before["archived"]
    assert named_dbs(jp) == FORMAT_10_DBS
    with Journal.open(jp, clock=FakeClock()) as j:  # upgraded once: a second open changes nothing
        assert j.format_version == S.FORMAT_VERSION and j.verify(full=True).ok


def test_an_older_deltafs_cannot_open_a_format_10_journal_as_an_empty_one(tmp_path):
    """A format-9 deltafs opened (or, as a writer, created) the ``meta``
    database first: the plain key ``meta`` makes that fail instead of a new
    journal being started inside this one."""
    jp = tmp_path / "j"
    with Journal.open(jp, create=True, clock=FakeClock()) as j:
        edits(j, 2)
    env = lmdb.open(str(jp), max_dbs=S.MAX_DBS, map_size=1 << 30)
    try:
        for create in (False, True):
            with pytest.raises(lmdb.IncompatibleError):
                env.open_db(S.DB_META, create=create)
    finally:
        env.close()


def test_file_ids_stay_below_the_paths_range(tmp_path):
    with Journal.open(tmp_path / "j", create=True, clock=FakeClock()) as j:
        with pytest.raises(ValueError, match="out of range"):
            j.commit([Change(op="create", file_id=1 << 63, path=b"a", mode=0o100644)])
        j.commit([Change(op="create", file_id=(1 << 63) - 1, path=b"a", mode=0o100644)])
        with j.reader() as r:
            assert r.file_id_at(b"a") == (1 << 63) - 1 and r.head_seq() == 1
            assert [p for p, _, _ in r.current_tree()] == [b"a"]


@pytest.mark.parametrize("st", [
    FileState(path=b"a", links=[b"a"], mode=0o100644, size=3, content_seq=4, last_seq=5),
    FileState(path=b"b", links=[b"a", b"b"], kind="l", target=b"t", rdev=9, xattrs={b"k": b"v"}),
    FileState(path=b"gone", links=[], deleted=True, last_seq=7),
])
def test_a_files_value_leaves_out_what_it_can_and_reads_back(st):
    packed = st.pack()
    d = msgpack.unpackb(packed, raw=False, strict_map_key=False)  # format 13: an array
    d += [None] * (14 - len(d))
    assert (d[9] is not None) == (not st.links or st.links[0] != st.path)
    assert (d[11] is not None) == (st.target is not None) and (d[12] is not None) == bool(st.xattrs)
    assert bool(d[13]) == st.deleted and (d[8] is None) == (st.last_seq == st.content_seq)
    assert FileState.unpack(packed) == st
    f12 = {"k": st.kind, "n": st.links, "c": st.content_seq, "s": st.size, "m": st.mode, "u": st.uid,
           "g": st.gid, "t": st.mtime_ns, "h": st.last_seq}  # formats 10-12: a map, defaults left out
    if not st.links or st.links[0] != st.path:
        f12["p"] = st.path
    f12.update({k: v for k, v in (("rd", st.rdev), ("tg", st.target), ("x", st.xattrs), ("d", st.deleted)) if v})
    f12 = msgpack.packb(f12, use_bin_type=True)
    assert FileState.unpack(f12) == st and len(packed) < len(f12)
    old = msgpack.packb({"p": st.path, "k": st.kind, "n": st.links, "c": st.content_seq, "s": st.size,
                         "m": st.mode, "u": st.uid, "g": st.gid, "t": st.mtime_ns, "rd": st.rdev,
                         "tg": st.target, "x": st.xattrs, "d": st.deleted, "h": st.last_seq}, use_bin_type=True)
    assert FileState.unpack(old) == st and len(packed) < len(old)  # format 9's values read as they are
