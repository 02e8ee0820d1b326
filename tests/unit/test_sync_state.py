"""The sync state's encoding (deltafs/sync/state.py): packed entries kept between saves."""

from __future__ import annotations

import msgpack
import pytest

from deltafs.sync import state as S

pytestmark = pytest.mark.unit


def plain(st: S.SyncState) -> bytes:
    """What to_wire wrote before it kept packed entries: packb of the whole dict."""
    from dataclasses import fields

    d = {f.name: getattr(st, f.name) for f in fields(st)}
    d["version"] = S.STATE_VERSION
    return msgpack.packb(d, use_bin_type=True)


def test_to_wire_is_packb_of_the_fields_across_saves(tmp_path):
    st = S.SyncState(url="file:///x", device="d" * 16, group_id="g")
    for i in range(50):
        st.files[b"f%d" % i] = {"p": b"f%d" % i, "k": "f", "x": False, "v": {"d" * 16: i}, "ls": i}
        st.chunks[bytes([i]) * 32] = ["members/p", i, 10]
        st.origins[i] = f"{'e' * 16}:{i}"
    assert st.to_wire() == plain(st)
    # replaced, added and removed entries after a save: the next save has them all
    st.files[b"f3"] = dict(st.files[b"f3"], ls=99)
    st.files[b"new"] = {"p": b"new", "k": "d", "x": False, "v": {}}
    del st.files[b"f7"]
    st.chunks.pop(bytes([5]) * 32)
    st.origins[1000] = "x:1"
    st.cursor = 42
    assert st.to_wire() == plain(st)
    S.save(str(tmp_path), st)
    back = S.load(str(tmp_path))
    assert back.files == st.files and back.chunks == st.chunks and back.origins == st.origins
    assert back.cursor == 42 and back.to_wire() == plain(st)
