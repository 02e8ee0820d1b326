"""The request loop: patched pyfuse3's direct loop and the stock one (issue 19).

The direct loop (tools/pyfuse3/patch.py, ``direct_loop``) blocks in poll(2)
on the FUSE fd and trio's epoll fd instead of going through trio for every
request.  What could go wrong is a hang: a handler waiting for a thread
(fsync, capture) or a timer (the journal's group commit) while the reader
sits in poll with no FUSE traffic to wake it.  Each case below is done with
nothing else talking to the mount, under both loops
(``PYFUSE3_DIRECT_LOOP=0`` selects the stock one in the same build).
"""

from __future__ import annotations

import os
import threading
import time

import pyfuse3
import pytest

from deltafs.journal import Journal

pytestmark = pytest.mark.timeout(180)


def journal_content(journal, rel: str) -> bytes | None:
    with Journal.open(str(journal), readonly=True) as j, j.reader() as r:
        fid = r.file_id_at(rel.encode())
        fs = r.file_state(fid) if fid else None
        if fs is None or fs.deleted:
            return None
        return r.read_content(fs.content_seq) if fs.content_seq else b""


@pytest.fixture(params=["direct", "stock"])
def loop_mount(request, monkeypatch, mount_factory):
    if request.param == "direct" and "direct_loop" not in getattr(pyfuse3, "DELTAFS_PATCHES", ()):
        pytest.skip("stock pyfuse3: no direct loop to test")
    monkeypatch.setenv("PYFUSE3_DIRECT_LOOP", "1" if request.param == "direct" else "0")
    return mount_factory


def timed_fsyncs(path, n: int) -> tuple[bytes, list[float]]:
    """n times: open, write 4 KiB, fsync, close; the sorted times of each."""
    took = []
    for i in range(n):
        data = os.urandom(4096) + b"%d" % i
        t0 = time.monotonic()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, data)
            os.fsync(fd)  # the handler waits for threads; nothing else wakes the loop
        finally:
            os.close(fd)
        took.append(time.monotonic() - t0)
    return data, sorted(took)


def test_fsync_alone_returns_durable(loop_mount):
    m = loop_mount()
    data, _ = timed_fsyncs(m.mnt / "f.bin", 20)
    assert journal_content(m.journal, "f.bin") == data


def test_fsync_alone_returns_promptly(loop_mount):
    # Without capture, no journal timer runs: a wake-up from the fsync
    # thread that the loop missed would be seen only at one of the daemon's
    # timers, seconds later (poll(2) without trio's epoll fd: 40 rounds took
    # 86 s); prompt ones take milliseconds (1.6 s for all 40 on a loaded
    # 2-core VM).
    m = loop_mount(None, "--no-capture")
    _, took = timed_fsyncs(m.mnt / "f.bin", 40)
    assert sum(took) < 15, took


def test_close_is_committed_without_more_requests(loop_mount):
    m = loop_mount()
    (m.mnt / "a.txt").write_bytes(b"hello\n")  # close: captured, committed after a timer
    deadline = time.monotonic() + 30
    while journal_content(m.journal, "a.txt") != b"hello\n":
        assert time.monotonic() < deadline, "close was never committed"
        time.sleep(0.05)  # reading the journal directly: no request reaches the mount


def test_fsyncs_while_other_requests_run(loop_mount):
    m = loop_mount()
    (m.mnt / "other.txt").write_bytes(b"x" * 100)
    errors: list[BaseException] = []
    stop = threading.Event()

    def busy():
        try:
            n = 0
            while not stop.is_set():
                os.stat(m.mnt / "other.txt")
                assert (m.mnt / "other.txt").read_bytes() == b"x" * 100
                with open(m.mnt / f"small{n % 7}", "wb") as f:
                    f.write(b"%d" % n)
                n += 1
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    t = threading.Thread(target=busy)
    t.start()
    try:
        for i in range(20):
            data = os.urandom(256 << 10)
            fd = os.open(m.mnt / "f.bin", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            assert journal_content(m.journal, "f.bin") == data
    finally:
        stop.set()
        t.join(60)
    assert not t.is_alive()
    assert not errors, errors
