"""The capture pipeline gives the heap's free pages back once it has been quiet
for IDLE_TRIM_S after commits (issue 19, eleventh session: after the full
bench's small captures, freed blocks stayed resident and the 4 GiB write
started from that high-water)."""

from __future__ import annotations

import trio
import trio.testing

from deltafs import heap
from deltafs.capture import Pipeline
from deltafs.capture import pipeline as P
from deltafs.journal import Change, Journal


async def wait_for(cond) -> None:
    """The trim runs in a worker thread: the mock clock jumps while it does."""
    with trio.fail_after(60):
        while not cond():
            await trio.sleep(0.01)


async def test_the_heap_is_trimmed_once_quiet_after_commits_and_not_while_busy(tmp_path, monkeypatch,
                                                                              autojump_clock):
    calls: list[bool] = []

    def trim(force: bool = False) -> bool:  # runs in a worker thread
        calls.append(force)
        return True
    monkeypatch.setattr(heap, "trim", trim)
    with Journal.open(str(tmp_path / "j"), create=True) as j:
        pipe = Pipeline(j)
        async with trio.open_nursery() as n:
            n.start_soon(pipe.committer)
            n.start_soon(pipe.idle_trimmer)
            await trio.sleep(10 * P.IDLE_TRIM_S)
            assert calls == []  # nothing committed yet: nothing to give back
            for i in range(8):  # busy: a commit every half IDLE_TRIM_S
                it = pipe.submit(Change(op="mkdir", path=b"d%d" % i, mode=0o40755))
                await it.done.wait()
                await trio.sleep(P.IDLE_TRIM_S / 2)
            assert calls == []
            await trio.sleep(P.IDLE_TRIM_S * 0.4)
            assert calls == []  # not yet IDLE_TRIM_S since the last commit
            await trio.sleep(P.IDLE_TRIM_S)
            await wait_for(lambda: calls)
            assert calls == [True]
            await trio.sleep(10 * P.IDLE_TRIM_S)
            assert len(calls) == 1  # one trim per quiet spell
            it = pipe.submit(Change(op="mkdir", path=b"e", mode=0o40755))
            await it.done.wait()
            await trio.sleep(2 * P.IDLE_TRIM_S)
            await wait_for(lambda: pipe.idle_trims == 2)
            assert len(calls) == 2
            n.cancel_scope.cancel()


def test_trim_gives_back_what_small_objects_left_resident():
    """What the idle trim is for: many small blocks freed between a few live ones
    stay resident until malloc_trim hands their pages back."""
    def anon() -> int:
        with open("/proc/self/status") as f:
            return next(int(x.split()[1]) for x in f if x.startswith("RssAnon:")) * 1024
    keep, junk = [], []
    for i in range(20_000):  # ~80 MiB of 4 KiB blocks, one in 64 kept
        (keep if i % 64 == 0 else junk).append(bytearray(4000))
    del junk
    before = anon()
    assert heap.trim(force=True)
    assert anon() < before - (32 << 20), (before, anon())
    del keep


def test_shrink_keeps_the_most_recently_used_entries():
    from deltafs.chunking import RawCache
    c = RawCache(1 << 20)
    for i in range(10):
        c.put(b"%016d" % i, bytes(50_000))
    assert c.get(b"%016d" % 0) is not None  # used again: now the newest
    c.shrink(120_000)
    assert c.size <= 120_000 and len(c) == 2
    assert b"%016d" % 0 in c and b"%016d" % 9 in c
    c.put(b"x" * 16, bytes(50_000))  # the budget is unchanged: it fills up again
    assert len(c) == 3


async def test_a_quiet_mount_shrinks_the_raw_cache_to_its_idle_size(tmp_path, autojump_clock):
    from deltafs.capture import Recorder
    from deltafs.capture import content as CC
    (tmp_path / "src").mkdir()
    with Journal.open(str(tmp_path / "j"), create=True) as j:
        rec = Recorder(j, str(tmp_path / "src"))
        cache = rec.content.raw_cache
        for i in range(CC.RAW_CACHE_BYTES // 60_000):  # a burst of captures filled it
            cache.put(b"%016d" % i, bytes(60_000))
        assert cache.size > CC.RAW_CACHE_IDLE_BYTES * 3
        async with trio.open_nursery() as n:
            await n.start(rec.run)
            it = rec.pipe.submit(Change(op="mkdir", path=b"d", mode=0o40755))
            await it.done.wait()
            await trio.sleep(P.IDLE_TRIM_S / 2)
            assert cache.size > CC.RAW_CACHE_IDLE_BYTES * 3  # not quiet long enough yet
            await trio.sleep(P.IDLE_TRIM_S)
            await wait_for(lambda: rec.pipe.idle_trims)
            assert CC.RAW_CACHE_IDLE_BYTES - 60_000 < cache.size <= CC.RAW_CACHE_IDLE_BYTES
            assert b"%016d" % (CC.RAW_CACHE_BYTES // 60_000 - 1) in cache  # the newest stay
            n.cancel_scope.cancel()
