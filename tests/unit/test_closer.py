"""fdcache._Closer: the slow close of an unlinked file's last descriptor happens
in a helper process, not in a thread of the daemon (issue 19: every os.close in
a thread dropped and took back the GIL the FUSE loop was using), and in a
thread again when the helper is gone.

A pipe's write end shows who holds the last reference: its read end sees EOF
only once every copy is closed.
"""

from __future__ import annotations

import os
import resource
import select

import pytest

from deltafs import fdcache


def eof_within(r: int, seconds: float = 20.0) -> bool:
    p = select.poll()  # (not select(): the numbers may pass FD_SETSIZE)
    p.register(r, select.POLLIN)
    return bool(p.poll(int(seconds * 1000))) and os.read(r, 1) == b""


def test_the_helper_process_makes_the_last_close_and_the_number_is_free_at_once():
    c = fdcache._Closer()
    try:
        for _ in range(50):
            r, w = os.pipe()
            c.close(w)
            # our copy is closed now: the number is free (the next descriptor may take it)
            try:
                os.fstat(w)
                raise AssertionError(f"descriptor {w} still open here")
            except OSError:
                pass
            assert eof_within(r)  # and the helper closed its copy, the last one
            os.close(r)
        assert c.handed == 50
        assert c.thread is None  # no thread of this process closed anything
        assert c.helper is not None and c.helper.pid != os.getpid()
    finally:
        helper = c.helper  # _stop() forgets a helper that has already exited
        c._stop()
    helper.wait(20)  # the helper exits once our end of its socket closes


def test_the_helper_closes_a_descriptor_only_once_the_next_one_arrives():
    """Our copy is closed right after the send: had the helper closed its copy
    first, ours would have been the last reference and the slow close would
    have been ours (issue 19: up to a third of rm -rf's closes with capture).
    The helper keeps the last descriptors it got until the next message (or
    ``hold`` seconds without one; a minute here, so the test is not timed)."""
    c = fdcache._Closer(hold=60.0)
    try:
        r1, w1 = os.pipe()
        c.close(w1)
        assert not eof_within(r1, 0.5)  # the helper still holds its copy
        r2, w2 = os.pipe()
        c.close(w2)
        assert eof_within(r1)  # the next one arrived: the first is closed
        assert not eof_within(r2, 0.5)
        helper = c.helper
    finally:
        c._stop()
    assert eof_within(r2)  # at the end of its socket the helper closes what it holds
    helper.wait(20)
    os.close(r1)
    os.close(r2)


def test_an_idle_helper_closes_what_it_holds():
    c = fdcache._Closer(hold=0.05)
    try:
        r, w = os.pipe()
        c.close(w)
        assert eof_within(r)  # no next message: closed after the hold
        os.close(r)
    finally:
        c._stop()


def test_the_helper_works_when_its_socket_number_is_past_fd_setsize():
    """The helper's socket keeps the daemon's descriptor number, which a mount
    with thousands of cached descriptors puts past 1024 (select() refuses it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1300:
        if hard != resource.RLIM_INFINITY and hard < 1300:
            pytest.skip(f"descriptor limit {hard} < 1300")
        resource.setrlimit(resource.RLIMIT_NOFILE, (1300, hard))
    filler = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    c = fdcache._Closer(hold=0.05)
    try:
        for _ in range(3):
            r, w = os.pipe()
            c.close(w)
            assert eof_within(r)
            os.close(r)
        assert c.sock.fileno() > 1024
        assert c.handed == 3 and not c.helper_failed and c.thread is None
        assert c.helper.poll() is None  # alive
    finally:
        c._stop()
        for fd in filler:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_dead_helper_falls_back_to_the_thread():
    c = fdcache._Closer()
    r, w = os.pipe()
    c.close(w)
    assert eof_within(r)
    os.close(r)
    c.helper.kill()
    c.helper.wait(20)
    for _ in range(3):  # the first send may still succeed into the dead peer's buffer
        r, w = os.pipe()
        c.close(w)
        assert eof_within(r)  # closed all the same
        os.close(r)
    assert c.helper_failed and c.thread is not None
