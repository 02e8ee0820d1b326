"""Nothing keeps a committed capture's changes once it is committed (issue 19,
eleventh session): not the committer's locals while it waits for the next batch,
not an idle worker thread of ``hops`` (its last call's arguments and result).
After a 4 GiB write both held its last spill group of payloads (up to
CHUNK_FLUSH_BYTES) and its packed chunk list until the next capture."""

from __future__ import annotations

import gc
import os
import random

import trio

from deltafs import chunking, hops
from deltafs.journal import Change

from test_history_identity import Driver
from tests.ops.inprocess import session
from test_solo_commit import open_write


def alive(kind) -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, kind))


async def test_a_big_captures_payloads_are_freed_once_committed(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    async with session(src) as (j, rec, ops):
        d = Driver(ops)
        data = random.Random(19).randbytes(12 << 20)  # incompressible: the bulk lane's payloads
        fh = await open_write(d, b"big.dat", data[:1 << 20])
        for o in range(1 << 20, len(data), 1 << 20):
            await ops.write(fh, o, data[o:o + (1 << 20)])
        await ops.fsync(fh, False)
        await ops.release(fh)
        await rec.drain()
        with j.reader() as r:
            assert r.read_content(r.file_state(r.file_id_at(b"big.dat")).content_seq) == data
        assert alive(chunking.NewChunk) == 0
        assert not any(isinstance(o, Change) and o.op == "write" for o in gc.get_objects())


async def test_an_idle_hop_worker_keeps_neither_arguments_nor_result():
    class Big:
        pass
    before = alive(Big)

    def work(x):
        return Big()
    arg = Big()
    got = await hops.run(work, arg)
    assert isinstance(got, Big)
    del got, arg
    for _ in range(100):  # the worker drops them right after handing the result back
        if alive(Big) == before:
            break
        await trio.sleep(0.01)
    assert alive(Big) == before
