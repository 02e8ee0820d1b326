"""The history view without FUSE: version names sort oldest first, permission
bits, listing stamps; compaction keeps versions a view holds open, and prunes
them on the next pass once released (also with incremental planning)."""

from __future__ import annotations

import pytest

from deltafs import maintenance as M
from deltafs.historyview import _grants, _stamp, parse_version_name, path_versions, version_name
from deltafs.journal import Change, Journal

from test_maintenance import DAY, HOUR, FakeClock, History

pytestmark = pytest.mark.unit


def test_version_names_sort_by_time_and_read_back():
    t = 1_764_900_000_123_000_000
    names = [version_name(t, 9), version_name(t + 1_000_000, 10), version_name(t + 86_400 * 10**9, 11)]
    assert names == sorted(names)
    assert names[0] == b"2025-12-05T02:00:00.123Z_v9"
    assert [parse_version_name(n) for n in names] == [9, 10, 11]
    assert parse_version_name(b"notes.txt") is None


def test_grants_uses_the_callers_class_only():
    me, other = (1000, frozenset({1000})), (2000, frozenset({50}))
    assert _grants(0o640, 1000, 50, me, 4) and _grants(0o640, 1000, 50, other, 4)
    assert not _grants(0o604, 1000, 50, other, 4)  # group class applies, not other
    assert not _grants(0o066, 1000, 1000, me, 4)  # owner class: no fallthrough
    assert _grants(0o711, 0, 0, other, 1) and not _grants(0o711, 0, 0, other, 4)


def test_stamp_keeps_the_millisecond_and_changes_with_the_names():
    base = 1_764_900_000_123_000_000
    a, b = _stamp(base, [b"x", b"y"]), _stamp(base, [b"y"])
    assert a // 10**6 == b // 10**6 == base // 10**6 and a != b


@pytest.fixture
def jc(tmp_path):
    clock = FakeClock()
    j = Journal.open(tmp_path / "j", create=True, clock=clock)
    yield j, clock
    j.close()


@pytest.mark.parametrize("dry_run_first", [False, True])
def test_held_version_survives_compaction_until_released(jc, dry_run_first):
    j, clock = jc
    h = History(j, clock)
    h.create(1, 20_000)
    old = h.head[1]
    for _ in range(3):
        h.advance(HOUR)
        h.save(1)
    h.advance(200 * DAY)
    h.save(1)
    held = M.held_versions(j)
    held[old] += 1
    if dry_run_first:
        assert old not in M.compact(j, dry_run=True).pruned
    M.compact(j)
    with j.reader() as r:
        assert old in set(r.retained_content())
        assert r.read_content(old) == h.content[old]
        assert old in {v.seq for v in path_versions(r, b"f1")}
    del held[old]
    M.compact(j)  # released: asked about again although the file did not change
    with j.reader() as r:
        assert old not in set(r.retained_content())
        assert old not in {v.seq for v in path_versions(r, b"f1")}


def test_path_versions_carry_the_mode_of_each_version(jc):
    j, clock = jc
    h = History(j, clock)
    h.create(1, 5_000)
    first = h.head[1]
    j.commit([Change(op="setattr", file_id=1, path=b"f1", mode=0o100600)])
    second = h.save(1)
    with j.reader() as r:
        vs = path_versions(r, b"f1")
    assert [(v.seq, v.mode & 0o777) for v in vs] == [(first, 0o644), (second, 0o600)]
