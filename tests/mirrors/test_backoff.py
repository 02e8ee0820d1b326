"""The mount's replication loop (MirrorWorker): backoff, circuit breaker,
pause/resume, flush; on trio's MockClock (autojump), so hours of retries
take no real time."""

from __future__ import annotations

import random
import threading
import sys
from pathlib import Path

import pytest
import trio

from deltafs.errors import MirrorError
from deltafs.mirrors import MirrorUnreachable, open_mirror
from deltafs.mirrors import replicate as R
from deltafs.mirrors.replicate import BREAKER_FAILURES, PROBE_INTERVAL, MirrorWorker

sys.path.insert(0, str(Path(__file__).parent))
from test_replication import Builder  # noqa: E402

pytestmark = pytest.mark.timeout(60)


class DownThenUp:
    """Stands in for a mirror whose server is unreachable for its first
    ``down`` passes (a fake: a real server cannot be made to fail on cue
    under a mock clock), then a working file:// mirror.  Records the trio
    time at which each pass starts (its first call reads the manifest)."""

    def __init__(self, inner, down: int) -> None:
        self.inner = inner
        self.url = inner.url
        self.down = down
        self.attempts: list[float] = []
        self.token = trio.lowlevel.current_trio_token()  # calls run in the worker's own I/O thread

    def get(self, name):
        if name == "manifest.json":
            self.attempts.append(trio.from_thread.run_sync(trio.current_time, trio_token=self.token))
            if self.down > 0:
                self.down -= 1
                raise MirrorUnreachable(f"cannot reach {self.url}: connection refused")
        return self.inner.get(name)

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.fixture
def b(tmp_path):
    bl = Builder(tmp_path / "j")
    yield bl
    bl.j.close()


async def _passes(w: MirrorWorker, until) -> list[str]:
    """Wait pass by pass until ``until()``; -> the worker's state after each pass."""
    states = []
    while not until():
        ev = w._passed
        await ev.wait()
        states.append(w.state)
    return states


def _head(b) -> int:
    with b.j.reader() as r:
        return r.head_seq()


async def test_backoff_grows_circuit_opens_probes_and_recovers(autojump_clock, b, tmp_path, caplog):
    b.write(b"a.txt", b"one\n")
    down = BREAKER_FAILURES + 3
    fake = DownThenUp(open_mirror(f"file://{tmp_path}/m"), down)
    w = MirrorWorker(b.j, fake, rnd=random.Random(3))
    async with trio.open_nursery() as n:
        await n.start(w.run)
        states = await _passes(w, lambda: w.seq == _head(b))
        st = await w.status()
        n.cancel_scope.cancel()
    assert states == ["retrying"] * (BREAKER_FAILURES - 1) + ["circuit open"] * 4 + ["ok"]
    t = fake.attempts[:down + 1]
    gaps = [b_ - a for a, b_ in zip(t, t[1:])]
    backoff, probes = gaps[:BREAKER_FAILURES - 1], gaps[BREAKER_FAILURES - 1:]
    for i, g in enumerate(backoff):  # full jitter in [d/2, d], d = 1, 2, 4, 8 s
        d = R.BACKOFF_BASE * 2 ** i
        assert d / 2 <= g <= d + 0.01, (i, gaps)
    assert all(g2 > g1 for g1, g2 in zip(backoff, backoff[1:])), gaps
    assert all(PROBE_INTERVAL / 2 <= g <= PROBE_INTERVAL + 0.01 for g in probes), gaps  # circuit open: probes
    assert st["state"] == "ok" and st["lag_records"] == 0 and st["failures"] == 0
    assert st["last_success_ns"] and st["last_error"] == f"cannot reach {fake.url}: connection refused"
    assert any("circuit open" in r.getMessage() for r in caplog.records)


async def test_status_while_down(autojump_clock, b, tmp_path):
    b.write(b"a.txt", b"one\n")
    fake = DownThenUp(open_mirror(f"file://{tmp_path}/m"), 10**6)
    w = MirrorWorker(b.j, fake, rnd=random.Random(1))
    async with trio.open_nursery() as n:
        await n.start(w.run)
        await _passes(w, lambda: w.failures >= BREAKER_FAILURES)
        st = await w.status()
        assert st["state"] == "circuit open" and st["lag_records"] == _head(b) > 0
        assert st["lag_bytes"] > 0 and st["retry_in_s"] <= PROBE_INTERVAL and "connection refused" in st["last_error"]
        with pytest.raises(MirrorError, match="connection refused"):
            await w.flush()  # a flush tries at once, and says why it cannot
        n.cancel_scope.cancel()


class GoneDuringFirstPass:
    """A drive that is gone while the first pass reads the manifest (a fake: a
    thread cannot be held inside a real directory read): that pass waits until
    the test lets it go, then fails; every later pass works."""

    def __init__(self, inner) -> None:
        self.inner, self.url = inner, inner.url
        self.entered, self.release = threading.Event(), threading.Event()
        self.first = True

    def get(self, name):
        if name == "manifest.json" and self.first:
            self.first = False
            self.entered.set()
            self.release.wait(30)
            raise MirrorError(f"mirror directory {self.url} does not exist (is the drive mounted?)")
        return self.inner.get(name)

    def __getattr__(self, name):
        return getattr(self.inner, name)


async def test_flush_is_judged_by_a_pass_that_starts_after_it(b, tmp_path):
    """A flush asked for while a pass that will fail is running (the drive came
    back meanwhile) runs a pass of its own and succeeds."""
    b.write(b"a.txt", b"one\n")
    fake = GoneDuringFirstPass(open_mirror(f"file://{tmp_path}/m"))
    w = MirrorWorker(b.j, fake, rnd=random.Random(1))
    async with trio.open_nursery() as n:
        await n.start(w.run)
        await trio.to_thread.run_sync(fake.entered.wait, 30)
        done = trio.Event()

        async def flush():
            await w.flush()
            done.set()

        n.start_soon(flush)
        with trio.fail_after(30):
            while w._passed.statistics().tasks_waiting == 0:  # the flush waits for the running pass
                await trio.sleep(0.01)
            fake.release.set()
            await done.wait()
        assert w.seq == _head(b) and w.failures == 0
        n.cancel_scope.cancel()


async def test_pause_stops_uploads_resume_catches_up(autojump_clock, b, tmp_path):
    fake = DownThenUp(open_mirror(f"file://{tmp_path}/m"), 0)
    w = MirrorWorker(b.j, fake)
    b.write(b"a.txt", b"one\n")
    async with trio.open_nursery() as n:
        await n.start(w.run)
        await _passes(w, lambda: w.seq == _head(b))
        w.pause()
        await trio.sleep(1)
        before = len(fake.attempts)
        b.write(b"a.txt", b"two\n")
        await trio.sleep(3600)  # an hour of mock time: no pass while paused
        assert len(fake.attempts) == before
        st = await w.status()
        assert st["state"] == "paused" and st["lag_records"] == 1
        with pytest.raises(MirrorError, match="paused"):
            await w.flush()
        w.resume()
        await _passes(w, lambda: w.seq == _head(b))
        assert (await w.flush())["seq"] == _head(b)
        n.cancel_scope.cancel()


class Hung:
    """Stands in for a server that takes requests and answers none (or one
    that trickles forever, which boto's per-read timeouts never end): its
    first manifest GET (or PUT) blocks until ``answer`` is set.  A real
    hung server (SIGSTOP) is tests/mount/test_mirror_stall.py; this one
    runs on real time with short limits."""

    def __init__(self, inner, op: str = "get") -> None:
        self.inner = inner
        self.url = inner.url
        self.op = op
        self.answer = threading.Event()
        self.answered = threading.Event()

    def _hang(self, op, name) -> None:
        if op == self.op and name == "manifest.json" and not self.answer.is_set():
            self.answer.wait(60)
            self.answered.set()

    def get(self, name):
        self._hang("get", name)
        return self.inner.get(name)

    def put(self, name, data):
        self._hang("put", name)
        return self.inner.put(name, data)

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.fixture
def short_limits(monkeypatch):
    monkeypatch.setattr(R, "CALL_DEADLINE", 1.0)
    monkeypatch.setattr(R, "STALL_AFTER", 0.3)
    monkeypatch.setattr(R, "FINAL_FLUSH_TIMEOUT", 0.5)


async def test_a_call_without_an_answer_is_stalled_then_times_out(b, tmp_path, short_limits):
    b.write(b"a.txt", b"one\n")
    hung = Hung(open_mirror(f"file://{tmp_path}/m"))
    w = MirrorWorker(b.j, hung, rnd=random.Random(2))
    async with trio.open_nursery() as n:
        await n.start(w.run)
        while w.state != "stalled":  # the manifest GET is in flight, nothing moves
            await trio.sleep(0.05)
        st = await w.status()
        assert st["stalled_s"] >= R.STALL_AFTER and st["in_flight"].startswith("get manifest.json")
        await _passes(w, lambda: w.failures >= 1)  # the call's deadline ends the pass
        assert isinstance(w.last_error, str) and "no complete answer within" in w.last_error
        assert w.timed_out and w.state == "stalled"  # still no progress since: still stalled
        hung.answer.set()  # the server answers again: the call left behind completes first
        await _passes(w, lambda: w.seq == _head(b))
        assert w.state == "ok" and (await w.status())["stalled_s"] is None
        n.cancel_scope.cancel()


async def test_unmount_leaves_a_hung_pass_behind_and_it_never_touches_the_journal(
        b, tmp_path, short_limits, monkeypatch):
    monkeypatch.setattr(R, "MAX_SEGMENT_RECORDS", 1)  # after each manifest PUT the pass reads the journal
    b.write(b"a.txt", b"one\n")
    hung = Hung(open_mirror(f"file://{tmp_path}/m"), op="put")
    w = MirrorWorker(b.j, hung)
    async with trio.open_nursery() as n:
        await n.start(w.run)
        while w.watch.call is None:
            await trio.sleep(0.01)
        t0 = trio.current_time()
        n.cancel_scope.cancel()  # unmount while the pass waits for the server
    assert trio.current_time() - t0 < R.CALL_DEADLINE  # did not wait for the call
    touched = threading.Event()
    real_reader = b.j.reader

    def spy():
        touched.set()
        return real_reader()

    b.j.reader = spy  # the daemon would close the journal now
    hung.answer.set()
    assert await trio.to_thread.run_sync(hung.answered.wait, 10)
    assert not await trio.to_thread.run_sync(touched.wait, 0.5)  # the pass stopped at the gate
