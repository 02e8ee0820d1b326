"""Many files written fast: the capture queue fills, closes wait for room
(backpressure, capture/pipeline.py), and still every version is recorded,
with its content, in the order it was written.

The daemon runs with a low descriptor limit (``prlimit``), which bounds the
queued content captures at 16 (half the descriptor reserve), so writers
outrun the journal on any machine.  Writer threads save each file twice;
`deltafs status --json` must show the waits while mounted, and after a
clean unmount the journal, read the way `deltafs log` reads it, must hold
both versions of every file, the first before the second.
"""

import json
import threading

import pytest

from fusetools import run_cli

pytestmark = pytest.mark.timeout(300)

WRITERS = 4
FILES = 150  # per writer
SIZE = 128 << 10


def data(w: int, i: int, v: int) -> bytes:
    return (b"writer %d file %d version %d\n" % (w, i, v)) * (SIZE // 32)


def test_many_files_written_fast_are_all_recorded(mount_factory):
    m = mount_factory(None, prefix=["prlimit", "--nofile=128:128"])
    errors = []

    def writer(w: int) -> None:
        try:
            d = m.mnt / f"w{w}"
            d.mkdir()
            for v in (1, 2):
                for i in range(FILES):
                    (d / f"f{i:03d}").write_bytes(data(w, i, v))
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(WRITERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=240)
    assert not errors and not any(t.is_alive() for t in threads), errors

    res = run_cli("status", "--json", m.mnt, timeout=60)
    assert res.returncode == 0, res.stderr.decode()
    cap = json.loads(res.stdout)["capture"]
    assert cap["backpressure_waits"] > 0, cap  # the queue did fill: the writers were held back
    assert cap["failures"] == 0, cap
    # transactions: fewer than the records (grouped), each kind counted within them
    assert 0 < cap["commits"] < cap["records"], cap
    assert cap["inline_commits"] + cap["solo_commits"] <= cap["commits"], cap
    m.umount()

    versions = m.versions()
    missing = []
    for w in range(WRITERS):
        for i in range(FILES):
            got = versions.get(b"w%d/f%03d" % (w, i), [])
            want = [data(w, i, 1), data(w, i, 2)]
            if [c for _, c in got] != want:  # (an empty create is no content version)
                missing.append((w, i, [c[:30] for _, c in got]))
    assert not missing, f"{len(missing)} files lack versions: {missing[:5]}"
    # each writer saved version 1 of all its files before any version 2
    for w in range(WRITERS):
        last_v1 = max(versions[b"w%d/f%03d" % (w, i)][0][0] for i in range(FILES))
        first_v2 = min(versions[b"w%d/f%03d" % (w, i)][1][0] for i in range(FILES))
        assert last_v1 < first_v2
