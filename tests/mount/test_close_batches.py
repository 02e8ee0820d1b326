"""Small files closed through the mount (cp -a, git add): their captures wait
in a group window for more (capture/pipeline.py DEFER_WINDOW, issue 19), and
an unmount right after the last close still leaves every version in the journal, each with its content, in
the order the files were closed, with a later save of a file after its
first one.
"""

import pytest

pytestmark = pytest.mark.timeout(300)

FILES = 300


def body(i: int, v: int) -> bytes:
    return b"file %d version %d\n" % (i, v) * (20 + i % 50)


def test_closed_small_files_are_grouped_and_all_recorded_at_unmount(mount_factory):
    m = mount_factory()
    d = m.mnt / "tree"
    d.mkdir()
    for i in range(FILES):
        (d / f"f{i:03d}").write_bytes(body(i, 1))
    for i in range(0, FILES, 10):  # a second save of some files, right after the first
        (d / f"f{i:03d}").write_bytes(body(i, 2))
    m.umount()  # no fsync, no wait: the unmount drains what is queued

    versions = m.versions()
    missing = []
    for i in range(FILES):
        want = [body(i, 1)] + ([body(i, 2)] if i % 10 == 0 else [])
        got = [c for _, c in versions.get(b"tree/f%03d" % i, [])]
        if got != want:
            missing.append((i, [c[:24] for c in got]))
    assert not missing, f"{len(missing)} files lack versions: {missing[:5]}"
    firsts = [versions[b"tree/f%03d" % i][0][0] for i in range(FILES)]
    assert firsts == sorted(firsts)  # in close order
