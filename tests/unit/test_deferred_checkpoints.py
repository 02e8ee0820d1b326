"""Chunk-list checkpoints left by a commit to a transaction of their own
(Journal.defer_checkpoints, write_due_lists; issue 19: a 64 MiB file's
checkpoint counted 3,400 references inside an fsync's commit, a 1 GiB
file's 65,000)."""

from __future__ import annotations

import random

import pytest
import trio
import trio.testing

from deltafs.capture.pipeline import Pipeline
from deltafs.journal import CHECKPOINT_EVERY, Journal
from deltafs.journal import core
from deltafs.journal import schema as S
from tests.unit.test_journal import FakeClock, version


@pytest.fixture
def long_lists(monkeypatch):
    """The test files' lists (~20 entries) count as long ones."""
    monkeypatch.setattr(core, "DEFER_LIST_ENTRIES", 1)


def _edits(rnd: random.Random, data: bytearray):
    off = rnd.randrange(len(data))
    n = rnd.randint(1, 3000)
    data[off : off + n] = rnd.randbytes(n)
    return [(off, off + n)]


def _state(j: Journal) -> tuple[dict, dict]:
    """(checkpoint seq -> list, chunk id -> refs) of the whole journal."""
    with j.reader() as r:
        cps = dict(r.checkpoints())
        refs = {bytes(k): S.loc_refs(bytes(v)) for k, v in r.txn.cursor(db=r.dbs[S.DB_CHUNKS])}
    return cps, refs


def _history(j: Journal, data: bytes, n: int, seed: int, after_commit=None) -> dict[int, bytes]:
    rnd = random.Random(seed)
    data = bytearray(data)
    base = j.commit([version(j, 7, b"f", bytes(data), cause="preimage")])[0]
    out = {base: bytes(data)}
    for _ in range(n):
        dirty = _edits(rnd, data)
        base = j.commit([version(j, 7, b"f", bytes(data), base_seq=base, dirty=dirty)])[0]
        out[base] = bytes(data)
        if after_commit is not None:
            after_commit(base)
    return out


def test_a_deferred_checkpoint_is_the_one_the_commit_would_have_written(tmp_path, long_lists):
    data = random.Random(1).randbytes(400_000)
    n = CHECKPOINT_EVERY + 5
    with Journal.open(tmp_path / "a", create=True, clock=FakeClock()) as a:
        _history(a, data, n, seed=2)
        inline = _state(a)
    with Journal.open(tmp_path / "b", create=True, clock=FakeClock()) as b:
        b.defer_checkpoints = True
        left = []

        def after(seq):
            if b.lists_due():
                left.append(seq)
                with b.reader() as r:  # not written by the commit itself
                    assert r.txn.get(S.checkpoint_key(seq), db=r.dbs[S.DB_CHECKPOINTS]) is None
                assert b.write_due_lists() == 1
                assert b.lists_due() == 0

        expected = _history(b, data, n, seed=2, after_commit=after)
        assert len(left) == 1 and b.lists_deferred == 1 and b.lists_written_later == 1
        assert _state(b) == inline  # same checkpoints under the same seqs, same reference counts
        b._clear_list_cache()
        with b.reader() as r:
            for seq, content in expected.items():
                assert b"".join(r.iter_content(seq)) == content
                assert len(r.list_chain(seq)[1]) <= CHECKPOINT_EVERY
        assert b.verify(full=True).ok


def test_write_due_lists_yields_to_a_waiting_commit_and_writes_nothing(tmp_path, long_lists):
    data = random.Random(3).randbytes(300_000)
    with Journal.open(tmp_path / "j", create=True, clock=FakeClock()) as j:
        j.defer_checkpoints = True
        _history(j, data, CHECKPOINT_EVERY, seed=4)
        assert j.lists_due() == 1
        seq = next(iter(j._due))
        before = _state(j)
        j.urgent = lambda: True  # someone waits: not even started
        assert j.write_due_lists() == -1
        calls = []

        def urgent():  # free when it starts, waited for once it counts the list's references
            calls.append(1)
            return len(calls) > 2

        j.urgent = urgent
        assert j.write_due_lists() == -1
        assert len(calls) == 3  # it stopped inside the list, and aborted
        assert _state(j) == before and j.lists_due() == 1
        j.urgent = None
        assert j.write_due_lists() == 1
        cps, _ = _state(j)
        assert seq in cps


def test_a_checkpoint_left_due_too_long_is_written_inline(tmp_path, long_lists):
    """Nobody wrote the deferred checkpoints: the chain never grows past
    2 x checkpoint_every (readers refuse CHECKPOINT_MAX + 10)."""
    data = random.Random(5).randbytes(300_000)
    with Journal.open(tmp_path / "j", create=True, clock=FakeClock()) as j:
        j.defer_checkpoints = True
        expected = _history(j, data, 2 * CHECKPOINT_EVERY + 5, seed=6)
        cps, _ = _state(j)
        assert len(cps) == 1
        j._clear_list_cache()
        with j.reader() as r:
            for seq, content in expected.items():
                assert len(r.list_chain(seq)[1]) <= 2 * CHECKPOINT_EVERY
                assert b"".join(r.iter_content(seq)) == content


def test_a_short_list_is_checkpointed_inline(tmp_path):
    """A short list's references cost less than a transaction of its own
    (sqlite's database file: ~10 entries, due every 32 commits)."""
    data = random.Random(11).randbytes(300_000)
    assert len(data) // (16 << 10) < core.DEFER_LIST_ENTRIES
    with Journal.open(tmp_path / "j", create=True, clock=FakeClock()) as j:
        j.defer_checkpoints = True
        _history(j, data, CHECKPOINT_EVERY + 2, seed=12)
        assert j.lists_due() == 0 and j.lists_deferred == 0
        cps, _ = _state(j)
        assert len(cps) == 1


def test_a_group_that_fails_leaves_no_due_checkpoint(tmp_path, long_lists):
    data = random.Random(7).randbytes(300_000)
    with Journal.open(tmp_path / "j", create=True, clock=FakeClock()) as j:
        j.defer_checkpoints = True
        rnd = random.Random(8)
        buf = bytearray(data)
        base = j.commit([version(j, 7, b"f", bytes(buf), cause="preimage")])[0]
        for _ in range(CHECKPOINT_EVERY - 1):
            dirty = _edits(rnd, buf)
            base = j.commit([version(j, 7, b"f", bytes(buf), base_seq=base, dirty=dirty)])[0]
        dirty = _edits(rnd, buf)
        good = version(j, 7, b"f", bytes(buf), base_seq=base, dirty=dirty)
        bad = version(j, 7, b"f", bytes(buf), base_seq=base, dirty=dirty)
        bad.size += 1  # rejected by the journal: its list sums to another size
        res = j.commit_many([[bad], [good]])
        assert isinstance(res[0], Exception) and res[1]
        assert list(j._due) == res[1]  # the good group's seq, not the failed one's


async def test_the_pipeline_writes_due_checkpoints_when_idle(tmp_path, long_lists):
    data = random.Random(9).randbytes(300_000)
    with Journal.open(tmp_path / "j", create=True, clock=FakeClock()) as j:
        pipe = Pipeline(j)
        async with trio.open_nursery() as n:
            n.start_soon(pipe.committer)
            n.start_soon(pipe.checkpointer)
            await trio.testing.wait_all_tasks_blocked()
            assert j.defer_checkpoints
            rnd = random.Random(10)
            buf = bytearray(data)
            it = pipe.submit(version(j, 7, b"f", bytes(buf), cause="preimage"))
            await pipe.committed(it)
            base = it.result[0]
            for _ in range(CHECKPOINT_EVERY):
                dirty = _edits(rnd, buf)
                it = pipe.submit(version(j, 7, b"f", bytes(buf), base_seq=base, dirty=dirty))
                await pipe.committed(it)
                base = it.result[0]
            assert j.lists_deferred == 1
            with trio.fail_after(10):
                while j.lists_due():
                    await trio.sleep(0.01)
            assert j.lists_written_later == 1
            cps, _ = _state(j)
            assert base in cps
            n.cancel_scope.cancel()
        assert not j.defer_checkpoints
