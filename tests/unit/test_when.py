"""WHEN parsing and resolution against a journal, with a fixed now."""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone

import pytest

from deltafs.errors import NotFoundError, UsageError
from deltafs.journal import Change, Journal
from deltafs.when import parse_when, resolve_when, since_seq

from test_journal import FakeClock

NOW = int(datetime(2026, 11, 23, 12, 0, 0).timestamp()) * 10**9  # local noon


def local_ns(*a) -> int:
    return int(time.mktime(datetime(*a).timetuple())) * 10**9


@pytest.mark.parametrize("text, seq", [("123", 123), ("v7", 7), ("V7", 7), ("@42", 42), (" 5 ", 5)])
def test_version_ids(text, seq):
    assert parse_when(text, NOW).seq == seq


@pytest.mark.parametrize("text, seconds", [
    ("10 minutes ago", 600), ("1 minute ago", 60), ("2 hours ago", 7200), ("2h ago", 7200),
    ("30 sec ago", 30), ("3 days ago", 3 * 86400), ("1 week ago", 604800), ("1.5 hours ago", 5400),
    ("10   MINUTES  ago", 600),
])
def test_relative(text, seconds):
    assert parse_when(text, NOW).time_ns == NOW - seconds * 10**9


def test_days_and_now():
    assert parse_when("now", NOW).is_now
    assert parse_when("today", NOW).time_ns == local_ns(2026, 11, 23)
    assert parse_when("today 9:00", NOW).time_ns == local_ns(2026, 11, 23, 9, 0)
    assert parse_when("yesterday", NOW).time_ns == local_ns(2026, 11, 22)
    assert parse_when("Yesterday 17:00", NOW).time_ns == local_ns(2026, 11, 22, 17, 0)
    assert parse_when("yesterday 17:00:30", NOW).time_ns == local_ns(2026, 11, 22, 17, 0, 30)


def test_iso():
    assert parse_when("2026-11-23", NOW).time_ns == local_ns(2026, 11, 23)
    assert parse_when("2026-11-23T09:00", NOW).time_ns == local_ns(2026, 11, 23, 9)
    assert parse_when("2026-11-23 09:00:05", NOW).time_ns == local_ns(2026, 11, 23, 9, 0, 5)
    utc = int(datetime(2026, 11, 23, 9, tzinfo=timezone.utc).timestamp()) * 10**9
    assert parse_when("2026-11-23T09:00Z", NOW).time_ns == utc
    assert parse_when("2026-11-23T10:00+01:00", NOW).time_ns == utc


@pytest.mark.parametrize("text", ["", "   ", "10 parsecs ago", "2026-13-45", "2026-11-23T25:00",
                                  "today 25:00"])
def test_bad_input(text):
    with pytest.raises(UsageError):
        parse_when(text, NOW)


def test_anything_else_is_a_snapshot_name():
    assert parse_when("before-upgrade", NOW).snapshot == "before-upgrade"


@pytest.fixture
def journal(tmp_path):
    clock = FakeClock(NOW - 3600 * 10**9)  # history starts an hour before NOW
    j = Journal.open(tmp_path / "j", create=True, clock=clock)
    for i in range(6):  # one record every 10 minutes
        j.commit([Change(op="create", file_id=i + 1, path=b"f%d" % i)])
        clock.ns += 600 * 10**9
    j.kv_put("snapshots", "nightly", {"seq": 3, "time_ns": 0})
    yield j
    j.close()


def test_resolve(journal):
    with journal.reader() as r:
        assert resolve_when(r, "now", NOW).seq == 6
        assert resolve_when(r, "v4", NOW).seq == 4
        assert resolve_when(r, "nightly", NOW).seq == 3
        assert resolve_when(r, "60 minutes ago", NOW).seq == 1
        assert resolve_when(r, "45 minutes ago", NOW).seq == 2
        assert resolve_when(r, "1 minute ago", NOW).seq == 6
        assert resolve_when(r, "today 11:25", NOW).seq == 3
        assert since_seq(r, "45 minutes ago", NOW) == 3
        assert since_seq(r, "40 minutes ago", NOW) == 3
        assert since_seq(r, "v4", NOW) == 4


def test_resolve_errors(journal):
    with journal.reader() as r:
        with pytest.raises(UsageError, match="before the first version"):
            resolve_when(r, "2 hours ago", NOW)
        with pytest.raises(UsageError, match="before the first version"):
            resolve_when(r, "yesterday", NOW)
        with pytest.raises(UsageError, match="in the future"):
            resolve_when(r, "2026-11-24", NOW)
        with pytest.raises(NotFoundError, match="unknown version v99"):
            resolve_when(r, "v99", NOW)
        with pytest.raises(NotFoundError):
            resolve_when(r, "0", NOW)
        with pytest.raises(NotFoundError, match="snapshot"):
            resolve_when(r, "no-such-snapshot", NOW)
        # clamped (log --since/--until) instead of refused
        assert resolve_when(r, "2 hours ago", NOW, clamp=True).seq == 0
        assert resolve_when(r, "2026-11-24", NOW, clamp=True).seq == 6
        assert since_seq(r, "1 week ago", NOW) == 1


def test_empty_journal(tmp_path):
    with Journal.open(tmp_path / "j", create=True) as j, j.reader() as r:
        with pytest.raises(UsageError, match="no history"):
            resolve_when(r, "1 minute ago")
        with pytest.raises(NotFoundError, match="empty"):
            resolve_when(r, "v1")
