"""Issue 19, daemon memory: a big file's chunk list is not held in several copies.

* the capture's list cache is bounded in bytes: a list larger than the whole
  cache is neither built nor kept, and the file's next capture reads it back
  from the journal;
* the writer keeps a capture's edit as it is (no copy of every entry) and
  applies a record to the tree state without decoding its chunk lists;
  an edit of other types (ids as memoryviews) is still normalised.
"""

from __future__ import annotations

import os
import random

from deltafs.capture import FULL
from deltafs.capture import content as capture
from deltafs.journal import records

from test_capture_cache import Counts, Daemon


def _write(d, name: bytes, data: bytes) -> None:
    (d.src / name.decode()).write_bytes(data)


def test_a_list_larger_than_the_cache_is_neither_built_nor_kept(tmp_path, monkeypatch):
    d = Daemon(tmp_path)
    big = bytearray(random.Random(1).randbytes(4 << 20))  # ~250 chunks
    small = random.Random(2).randbytes(64 << 10)  # a few
    monkeypatch.setattr(capture, "LIST_CACHE_ENTRIES", 100)
    _write(d, b"big", big)
    _write(d, b"small", small)
    fd = os.open(d.src / "big", os.O_RDONLY)
    try:
        ch, cache = d.rec.content.compute(fd, b"big", "write", FULL, None)
    finally:
        os.close(fd)
    assert cache is None and sum(len(refs) for _, _, refs in ch.edit) > 100
    seq = d.j.commit([ch])[-1]
    s_small = d.capture(b"small")
    assert set(d.rec.content.lists) == {s_small}
    d.rec.content.remember_list(seq + 1000, [(b"x" * 16, 1)] * 200, list(range(201)))
    assert seq + 1000 not in d.rec.content.lists  # not kept either, whoever hands it
    counts = Counts(monkeypatch)
    big[100:104] = b"EDIT"
    _write(d, b"big", big)
    seq2 = d.capture(b"big", [(100, 104)], seq)
    assert counts.lists == 1  # read back from the journal
    assert d.content(seq2) == bytes(big)
    d.capture(b"small", [(0, 1)], s_small)
    assert counts.lists == 1  # the small file's list came from the cache
    d.j.close()


def test_the_writer_keeps_a_capture_edit_and_applies_without_decoding_lists(tmp_path):
    d = Daemon(tmp_path)
    data = random.Random(3).randbytes(1 << 20)
    _write(d, b"f", data)
    fd = os.open(d.src / "f", os.O_RDONLY)
    try:
        ch, _ = d.rec.content.compute(fd, b"f", "write", FULL, None)
    finally:
        os.close(fd)
    edit = ch.edit
    seq = d.j.commit([ch])[-1]
    assert ch.edit is edit  # kept, not copied entry by entry
    with d.j.reader() as r:
        value = bytes(r.raw_record(seq))
    full, bare = records.decode_record(value, seq), records.decode_record(value, seq, lists=False)
    assert [len(x[2]) for x in full.edit] == [len(x[2]) for x in edit] and bare.edit is None
    assert (bare.op, bare.path, bare.size, bare.file_id) == (full.op, full.path, full.size, full.file_id)
    # a foreign edit (ids as memoryviews, as a decoded record has them) is normalised
    data2 = random.Random(4).randbytes(1 << 20)
    _write(d, b"g", data2)
    fd = os.open(d.src / "g", os.O_RDONLY)
    try:
        ch2, _ = d.rec.content.compute(fd, b"g", "write", FULL, None)
    finally:
        os.close(fd)
    ch2.edit = [(s, c, [(memoryview(i), n) for i, n in refs]) for s, c, refs in ch2.edit]
    seq2 = d.j.commit([ch2])[-1]
    assert all(type(i) is bytes for _, _, refs in ch2.edit for i, _ in refs)
    assert d.content(seq2) == data2 and d.content(seq) == data
    d.j.close()


def test_a_deleted_file_list_leaves_the_cache(tmp_path):
    """A file's last name unlinked: its kept chunk list goes with it, so
    deleted files (a build's temporaries, a bench's big scratch file) do not
    push a live file's list out of the bounded cache and make that file's
    next save read its list back from the journal.  A file renamed away
    keeps its list (it lives on under its new name)."""
    d = Daemon(tmp_path)
    _write(d, b"gone", random.Random(4).randbytes(256 << 10))
    _write(d, b"moved", random.Random(5).randbytes(256 << 10))
    s_gone, s_moved = d.capture(b"gone"), d.capture(b"moved")
    content = d.rec.content
    assert {s_gone, s_moved} <= set(content.lists)
    entries = content.list_entries
    content.remember_base(b"gone", s_gone, gone=True)
    content.remember_base(b"moved", s_moved)
    assert s_gone not in content.lists and s_moved in content.lists
    assert content.list_entries < entries
    assert content.base_hints[b"gone"][1] == s_gone  # still the delta base hint of a file created there
    d.j.close()
