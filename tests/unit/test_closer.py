"""fdcache._Closer: the slow close of an unlinked file's last descriptor happens
in a helper process, not in a thread of the daemon (issue 19: every os.close in
a thread dropped and took back the GIL the FUSE loop was using), and in a
thread again when the helper is gone.

A pipe's write end shows who holds the last reference: its read end sees EOF
only once every copy is closed.
"""

from __future__ import annotations

import os
import select

from deltafs import fdcache


def eof_within(r: int, seconds: float = 20.0) -> bool:
    ready, _, _ = select.select([r], [], [], seconds)
    return bool(ready) and os.read(r, 1) == b""


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
