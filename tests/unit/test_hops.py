"""deltafs.hops: the cheap thread hand-off keeps to_thread.run_sync's semantics."""

import threading

import pytest
import trio

from deltafs import hops


async def test_runs_in_another_thread_and_returns_the_result():
    main = threading.get_ident()
    assert await hops.run(lambda a, b: (a + b, threading.get_ident() != main), 2, 3) == (5, True)


async def test_raises_the_callers_exception():
    def boom():
        raise OSError(5, "EIO")
    with pytest.raises(OSError) as e:
        await hops.run(boom)
    assert e.value.errno == 5


async def test_concurrent_calls_do_not_wait_for_each_other():
    # two calls that each wait for the other: a single worker would deadlock
    a, b = threading.Event(), threading.Event()

    def one():
        a.set()
        assert b.wait(10)

    def two():
        b.set()
        assert a.wait(10)
    with trio.fail_after(20):
        async with trio.open_nursery() as n:
            n.start_soon(hops.run, one)
            n.start_soon(hops.run, two)


async def test_a_cancelled_caller_still_waits_for_its_call():
    done = []

    def slow():
        threading.Event().wait(0.2)
        done.append(1)
    with trio.move_on_after(0.02):
        await hops.run(slow)
    assert done == [1]  # not abandoned: it finished before the caller went on


async def test_limiter_bounds_concurrency():
    lim = trio.CapacityLimiter(1)
    running, peak = [0], [0]
    lock = threading.Lock()

    def work():
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        threading.Event().wait(0.02)
        with lock:
            running[0] -= 1
    async with trio.open_nursery() as n:
        for _ in range(4):
            n.start_soon(lambda: hops.run(work, limiter=lim))
    assert peak[0] == 1
