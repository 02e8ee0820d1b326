"""A small file's fsync returns while another file's capture, queued before
it, is still being computed (capture/pipeline.py, "Passing"; issue 19: a
1-byte edit's fsync waited ~1 s behind a 1 GiB file's capture).

The big file's capture is held before it is computed by the daemon's test
hook (DELTAFS_TEST_HOLD_CAPTURE, capture/recorder.py): it stays uncomputed
until the test lets it go, so the small fsync can only return by passing it.
"""

import hashlib
import os
import threading
import time

import pytest

from deltafs.capture import MAX_BYTES

pytestmark = pytest.mark.timeout(300)


@pytest.mark.parametrize("big_mib", [4, (MAX_BYTES >> 20) + 1], ids=["4MiB", "over-the-queue-bound"])
def test_a_small_fsync_commits_while_another_files_capture_is_computed(mount_factory, tmp_path, monkeypatch,
                                                                      big_mib):
    """Over the queue's byte bound (MAX_BYTES), every request that queues a
    record waits for room until the big capture commits; the small file's
    fsync must not: the kernel's c/mtime SETATTR before it records nothing."""
    hold = tmp_path / "hold"
    hold.mkdir()
    monkeypatch.setenv("DELTAFS_TEST_HOLD_CAPTURE", f"big.dat:{hold}")
    m = mount_factory()
    small = m.mnt / "small.dat"
    fd = os.open(small, os.O_RDWR | os.O_CREAT, 0o644)
    block = os.urandom(1 << 20)
    big_hash = hashlib.sha256()
    try:
        os.write(fd, b"a" * 8192)
        os.fsync(fd)

        big_synced = threading.Event()

        def big():
            with open(m.mnt / "big.dat", "wb") as f:
                for i in range(big_mib):
                    piece = i.to_bytes(8, "little") + block[8:]
                    f.write(piece)
                    big_hash.update(piece)
                f.flush()
                os.fsync(f.fileno())
            big_synced.set()
        tb = threading.Thread(target=big)
        tb.start()
        deadline = time.monotonic() + 60
        while not (hold / "held").exists():  # the big file's capture is queued, and held
            assert time.monotonic() < deadline, "the big file's capture was never held"
            time.sleep(0.01)

        small_synced = threading.Event()

        def edit():
            os.pwrite(fd, b"X", 100)
            os.fsync(fd)
            small_synced.set()
        ts = threading.Thread(target=edit)
        ts.start()
        passed = small_synced.wait(30)
        held = not big_synced.is_set()
    finally:
        (hold / "go").touch()
    ts.join(60)
    tb.join(60)
    assert passed, "the small file's fsync waited for the big file's held capture"
    assert held and big_synced.is_set()
    os.close(fd)
    m.umount()

    versions = m.versions()
    (big_seq, big_content), = versions[b"big.dat"]
    assert hashlib.sha256(big_content).digest() == big_hash.digest()
    small_seq, small_content = versions[b"small.dat"][-1]
    assert small_content == b"a" * 100 + b"X" + b"a" * 8091
    assert small_seq < big_seq  # committed ahead of the capture queued before it
