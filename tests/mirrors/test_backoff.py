"""The mount's replication loop (MirrorWorker): backoff, circuit breaker,
pause/resume, flush; on trio's MockClock (autojump), so hours of retries
take no real time."""

from __future__ import annotations

import random
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
