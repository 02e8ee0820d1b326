"""Pack reads inside ``exact_reads()`` ask the kernel for exactly the range
they slice (MADV_WILLNEED on its pages) before faulting it in: a cold
small edit's delta base no longer reads the device's whole read-around
(8 MiB on the bench machine's disk; issue 19, tenth session)."""

from __future__ import annotations

import mmap
import random
import threading

from deltafs.journal import Journal, exact_reads
from deltafs.journal import packs as P
from tests.unit.test_journal import FakeClock, version


class Spy:
    """A pack map that records its advice."""

    def __init__(self, m) -> None:
        self.m, self.advice = m, []

    def __len__(self) -> int:
        return len(self.m)

    def __getitem__(self, k):
        return self.m[k]

    def madvise(self, *a) -> None:
        self.advice.append(a)
        self.m.madvise(*a)


def test_reads_in_exact_reads_advise_exactly_their_pages(tmp_path):
    data = random.Random(1).randbytes(200_000)
    with Journal.open(tmp_path / "j", create=True, clock=FakeClock()) as j:
        j.commit([version(j, 1, b"f", data)])
        packs = j._storage.packs
        with j.reader() as r:
            cid = r.chunk_list(1)[0][0]
            r.raw_chunk(cid)  # mapped
            (pack, m), = packs._maps.items()
            spy = packs._maps[pack] = Spy(m)
            plain = r.raw_chunk(cid)
            assert spy.advice == []  # outside: the kernel's usual read-around
            with exact_reads():
                assert r.raw_chunk(cid) == plain
                seen = []
                t = threading.Thread(target=lambda: seen.append(r.raw_chunk(cid)))
                t.start()
                t.join()
            assert len(spy.advice) == 1  # this thread's read only, not the other thread's
            (how, start, length), = spy.advice
            assert how == mmap.MADV_WILLNEED and start % mmap.PAGESIZE == 0
            loc_off = next(off for off in range(start, start + mmap.PAGESIZE) if m[off:off + len(plain)] == plain)
            assert start <= loc_off < start + mmap.PAGESIZE and start + length == loc_off + len(plain)
            assert not getattr(P._exact, "on", False)  # restored on exit


def test_a_solo_fsync_capture_computes_with_exact_reads(tmp_path):
    from deltafs.capture.recorder import Recorder

    with Journal.open(tmp_path / "j", create=True, clock=FakeClock()) as j:
        rec = Recorder(j, str(tmp_path))
        inside = []

        def compute(*a):
            inside.append(getattr(P._exact, "on", False))
            raise OSError("stop here")
        rec.content.compute = compute
        try:
            rec._compute_commit(-1, b"f", "fsync", None, 0, None, 0)
        except OSError:
            pass
        assert inside == [True] and not getattr(P._exact, "on", False)
