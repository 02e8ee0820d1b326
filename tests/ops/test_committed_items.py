"""Issue 19, daemon memory: a committed capture leaves nothing of itself behind.

A committed Item stays referenced (the file's ``NodeCapture.last_item``, the
pipeline's ``last_item``) until the file's next capture, which for most files
is never: it must not keep the changes it committed (a content version's
chunk payloads and edit: the whole compressed file for a new one, ~11 MiB of
tuples for a 4 GiB file) nor the chunk list it handed to the list cache.
"""

from __future__ import annotations

from test_save_rules import mounted

from deltafs.capture import NodeCapture


async def test_a_committed_capture_keeps_nothing_of_what_it_committed(tmp_path):
    async with mounted(tmp_path) as s:
        for i in range(3):
            await s.d.save(b"f%d" % i, bytes(range(256)) * 400 * (i + 1))
        await s.rec.drain()
        items = [n.cap.last_item for n in s.ops.nodes.values()
                 if n.cap.__class__ is NodeCapture and n.cap.last_item is not None]
        assert len(items) == 3
        for it in items + [s.rec.pipe.last_item]:
            assert it.done.is_set() and it.result
            assert not it.changes and it.list_cache is None and it.after is None
        # the list cache got each file's list all the same (the next capture needs it)
        assert len(s.rec.content.lists) == 3
        assert await s.contents(b"f2") == [bytes(range(256)) * 1200]
