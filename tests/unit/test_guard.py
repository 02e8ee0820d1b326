"""The guard's detector on synthetic committed changes (docs/guard.md): the
scoring rule, each attack shape, the benign shapes, the window."""

from __future__ import annotations

import gzip
import os
import zlib
import random
import time
import zlib

import pytest

from deltafs import chunking, guard
from deltafs.journal import Change

TEXT = b"".join(b"line %d of a quarterly report, the customer total\n" % i for i in range(400))


class World:
    """A fake capture side: raw chunks by id (capture's RawCache) and a clock."""

    def __init__(self, level="normal"):
        self.raw = {}
        self.t = 1000.0
        self.seq = 0
        self.det = guard.Detector(level, raw=self.raw.get, clock=lambda: self.t)
        self.old = {}  # path -> chunk id of its current content (one chunk per file here)

    def _chunk(self, data: bytes, base: bytes | None):
        b = chunking.Base(base, self.raw[base], 0) if base is not None else None
        nc = chunking.build_chunk(data, b)
        self.raw[nc.id] = data
        return nc

    def put(self, path: bytes, data: bytes, cause="write"):
        """A save of path: an edit of its previous content if it had one."""
        base = self.old.get(path)
        nc = self._chunk(data, base)
        self.old[path] = nc.id
        ch = Change(op="write", path=path, size=len(data), cause=cause, base_seq=1 if base else 0,
                    edit=[(0, 1 if base else 0, [(nc.id, len(data))])], chunks=[nc])
        return self.feed(ch)

    def feed(self, *changes):
        seqs = []
        for _ in changes:
            self.seq += 1
            seqs.append(self.seq)
        return self.det.observe(changes, seqs)

    def unlink(self, path):
        self.old.pop(path, None)
        return self.feed(Change(op="unlink", path=path))

    def rename(self, a, b):
        self.old[b] = self.old.pop(a, None)
        return self.feed(Change(op="rename", path=a, path2=b))


def corpus(w: World, n=30):
    rng = random.Random(1)
    paths = []
    for i in range(n):
        p = b"docs/file%d.%s" % (i, [b"txt", b"pdf", b"csv"][i % 3])
        body = TEXT[rng.randint(0, 1000):] + b"%d\n" % i
        if p.endswith(b".pdf"):
            body = b"%PDF-1.4\n" + body
        w.put(p, body, cause="scan")  # the mount-time scan: not scored
        paths.append(p)
    return paths


def enc(data: bytes) -> bytes:
    return os.urandom(len(data))  # as good as AES output for every signal here


def test_signals_of_one_encrypted_file():
    w = World()
    p = corpus(w)[1]  # a .pdf
    w.put(p, enc(w.raw[w.old[p]]))
    (h,) = w.det.hits
    assert h.score == 1.0 and {"type", "entropy"} <= set(h.reasons)


def test_in_place_encryption_alerts_at_five_files():
    w = World()
    paths = corpus(w)
    for i, p in enumerate(paths):
        a = w.put(p, enc(w.raw[w.old[p]]))
        if a:
            break
    assert a is not None and i + 1 == 5
    assert a.first_seq == len(paths) + 1  # the first damaged version: roll back to the record before it
    assert w.det.alert is a
    assert w.put(paths[-1], enc(b"x" * 2000)) is None  # one alert until resume
    w.det.resume()
    assert w.det.alert is None and w.det.score() == 0


@pytest.mark.parametrize("level,files", [("high", 3), ("normal", 5), ("low", 10)])
def test_levels(level, files):
    w = World(level)
    paths = corpus(w)
    n = next(i + 1 for i, p in enumerate(paths) if w.put(p, enc(w.raw[w.old[p]])))
    assert n == files


def test_first_4k_and_stripes_and_header_kept():
    for attack in ("head", "stripes", "keep-header"):
        w = World()
        paths = corpus(w)
        for i, p in enumerate(paths):
            d = bytearray(w.raw[w.old[p]])
            if attack == "head":
                d[:4096] = enc(bytes(d[:4096]))
            elif attack == "stripes":
                for o in range(0, len(d), 64):
                    d[o:o + 16] = enc(bytes(d[o:o + 16]))
            else:
                d[16:] = enc(bytes(d[16:]))
            if w.put(p, bytes(d)):
                break
        assert w.det.alert is not None and i + 1 <= 20, (attack, i)


def test_first_4k_scores_a_whole_file_when_the_old_head_was_not_sampled():
    """The first save of a file since the mount: its old first chunk is no
    longer in capture's raw cache, so only the extension tells its type.  A
    head that went random where a text file or a PDF was counts the entropy
    signal too (a whole file, 1.0; it was 0.5/0.75: 8-10 files before the
    alert in the mount bench), so 5 files raise the alert."""
    w = World()
    paths = corpus(w)
    for i, p in enumerate(paths[:5]):
        old = w.old[p]
        d = bytearray(w.raw[old])
        d[:4096] = enc(bytes(d[:4096]))
        nc = w._chunk(bytes(d), old)
        assert nc.base_id == old  # the rest of the chunk is unchanged: still a delta of the old one
        del w.raw[old]  # left the raw cache: no old head sample
        w.old[p] = nc.id
        a = w.feed(Change(op="write", path=p, size=len(d), cause="write", base_seq=1,
                          edit=[(0, 1, [(nc.id, len(d))])], chunks=[nc]))
        h = w.det.hits[-1]
        assert h.key == p and "type" in h.reasons and "entropy" in h.reasons and h.score == 1.0, h
    assert a is not None and a.files == 5


def test_first_4k_of_a_compressed_format_scores_a_whole_file():
    """A JPEG's or a zip's head is random-looking already, so no entropy rise
    shows; losing the magic number to 4 KiB of random bytes of no format
    counts a quarter more than the type alone (0.75): 5 files alert, not 7.
    A re-save into another recognised format (a HEIC in a .jpg) does not."""
    w = World()
    rng = random.Random(3)
    jpeg = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + bytes(rng.randrange(256) for _ in range(30_000))
    for i in range(5):
        p = b"photos/img%d.jpg" % i
        w.put(p, jpeg, cause="scan")
        d = enc(jpeg[:4096]) + jpeg[4096:]
        a = w.put(p, d)
        h = w.det.hits[-1]
        assert h.key == p and h.reasons[:2] == ("type", "entropy") and h.score == 1.0, h
    assert a is not None and a.files == 5
    w = World()
    p = b"photos/heic.jpg"
    w.put(p, jpeg, cause="scan")
    w.put(p, b"\0\0\0\x18ftypheic" + jpeg[12:])
    assert not w.det.hits or "entropy" not in w.det.hits[-1].reasons


def test_a_new_text_files_head_is_remembered_below_every_threshold():
    """A new file's text head is sampled sparsely (every 16th byte): what the
    guard remembers for its next save stays far below the entropy thresholds,
    so an edit that keeps it text scores nothing and encryption still does."""
    w = World()
    p = b"docs/new.txt"
    w.put(p, TEXT[:6000])
    kind, ent = w.det.memory[p]
    assert kind == "text" and ent < 5.0
    w.put(p, TEXT[:6000].replace(b"customer", b"client"))
    assert not w.det.hits
    w.put(p, enc(TEXT[:6000]))
    assert w.det.hits and w.det.hits[-1].score == 1.0


def test_encrypt_and_rename_and_write_new_delete_old():
    w = World()
    paths = corpus(w)
    for i, p in enumerate(paths):
        if w.put(p, enc(w.raw[w.old[p]])) or w.rename(p, p + b".locked"):
            break
    assert w.det.alert and i + 1 <= 5
    w = World()
    paths = corpus(w)
    for i, p in enumerate(paths):
        w.put(p + b".enc", enc(w.raw[w.old[p]]))  # a new file...
        if w.unlink(p):  # ...then the old one goes
            break
    assert w.det.alert and i + 1 <= 10
    assert any("replaced" in h.reasons for h in w.det.alert.hits)


def test_slow_attack_stays_in_the_window():
    w = World()
    paths = corpus(w)
    for i, p in enumerate(paths):
        w.t += 30
        if w.put(p, enc(w.raw[w.old[p]])):
            break
    assert w.det.alert and i + 1 == 5
    # but an hour between files at normal is outside the window
    w = World()
    paths = corpus(w)
    for p in paths[:10]:
        w.t += 3601
        assert w.put(p, enc(w.raw[w.old[p]])) is None


def test_benign_shapes_stay_quiet():
    w = World("high")
    paths = corpus(w, 60)
    for p in paths:  # edits of text
        w.put(p, w.raw[w.old[p]].replace(b"customer", b"client"))
    for p in paths:  # gzip -r: a valid .gz appears, the original goes
        data = w.raw[w.old[p]]
        w.put(p + b".gz", gzip.compress(data))
        w.unlink(p)
    for i in range(60):  # a build rewriting outputs with other bytes
        w.put(b"build/obj%d.o" % i, b"\x7fELF" + os.urandom(50) + TEXT[:3000])
        w.put(b"build/obj%d.o" % i, b"\x7fELF" + os.urandom(50) + TEXT[1000:4000])
    for i in range(60):  # images imported (compressed, valid) and re-saved
        png = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR" + zlib.compress(os.urandom(3000))
        w.put(b"photos/img%d.png" % i, png)
        w.put(b"photos/img%d.png" % i, png[:16] + os.urandom(3000))
    for i in range(60):  # rsync's temp names renamed into place
        w.put(b"dst/.f%d.txt.Ab3dE" % i, TEXT)
        w.rename(b"dst/.f%d.txt.Ab3dE" % i, b"dst/f%d.txt" % i)
    w.put(b"secret.txt.gpg", os.urandom(5000))  # gpg -c of one file
    assert w.det.alert is None, [h.to_dict() for h in w.det.hits]


def test_helpers():
    assert guard.ext_of(b"a/b.PDF") == ".pdf" and guard.ext_of(b"a/.bashrc") == ""
    assert guard.stem_of(b"a/b.pdf.locked") == b"a/b.pdf" and guard.stem_of(b"x") == b"x"
    assert guard.format_of(gzip.compress(b"x")) == "gzip"
    assert guard.type_of(TEXT[:4096]) == "text" and guard.type_of(os.urandom(4096)) is None
    assert 7.5 < guard.entropy(os.urandom(4096)) <= 8 and guard.entropy(b"aaaa") == 0
    with pytest.raises(ValueError):
        guard.Detector("loud")


def test_open_then_delete_counts_opens():
    """Random names: no name pairs the new file with the old one; the open
    of the original for reading (ops.open) does."""
    w = World()
    paths = corpus(w)
    for i, p in enumerate(paths):
        w.det.note_opens([p])  # the attacker reads the original...
        w.put(b"x/%032x" % random.Random(i).getrandbits(128), enc(w.raw[w.old[p]]))  # ...writes a random name
        if w.unlink(p):  # ...and deletes the original
            break
    assert w.det.alert and i + 1 <= 5, i
    assert all("read" in h.reasons for h in w.det.alert.hits)
    # without the opens the same attack scores nothing (new opaque files alone are no damage)
    w = World()
    paths = corpus(w)
    for i, p in enumerate(paths):
        w.put(b"x/%032x" % random.Random(i).getrandbits(128), enc(w.raw[w.old[p]]))
        assert w.unlink(p) is None
    assert w.det.score() == 0


def test_open_then_delete_stays_quiet_when_nothing_explains_it():
    w = World("high")
    paths = corpus(w)
    w.put(b"download.bin", os.urandom(5000))  # one new opaque file pairs with at most one delete
    for p in paths:
        w.det.note_opens([p])
        w.unlink(p)
    assert w.det.alert is None and w.det.score() == 1.0
    # a file opened only after the new opaque file appeared is not explained by it
    w = World("high")
    paths = corpus(w)
    for i, p in enumerate(paths[:10]):
        w.put(b"n%d.bin" % i, os.urandom(5000))
        w.t += 1
        w.det.note_opens([p])
        w.unlink(p)
    assert w.det.score() == 0
    # restic prune: opaque packs read and deleted, new opaque packs written
    w = World("high")
    for i in range(20):
        w.put(b"repo/data/%02d/p%d" % (i, i), os.urandom(5000))
    for i in range(20):
        w.det.note_opens([b"repo/data/%02d/p%d" % (i, i)])
        w.put(b"repo/data/%02d/q%d" % (i, i), os.urandom(5000))
        w.unlink(b"repo/data/%02d/p%d" % (i, i))
    assert w.det.score() == 0


def test_a_delete_committed_before_the_new_files_content_still_pairs():
    """Capture commits a namespace change (the unlink) as soon as it is made,
    a content version only once its capture ran: so an attacker writing
    X.locked (or a random name) and then deleting X gets the delete scored
    before the new file's content.  The pairing then happens when the
    content comes (within LATE_PAIRING seconds), in both forms; a file
    created after the delete still explains nothing."""
    for form in ("stem", "random"):
        w = World()
        paths = [p for p in corpus(w) if not p.endswith(b".csv")]
        alert = None
        for i, p in enumerate(paths):
            new = p + b".locked" if form == "stem" else b"docs/%08x" % (i * 7919)
            if form == "random":
                w.det.note_opens([p])
            w.feed(Change(op="create", path=new))  # the create goes before the delete
            w.unlink(p)  # ... and is committed before the new file's content
            w.t += 0.2
            alert = w.put(new, enc(w.raw[w.old.get(p) or next(iter(w.raw))]))
            if alert is not None:
                break
        assert alert is not None, form
        assert alert.files == 5 and i == 4, (form, i, alert.files)
        reasons = {r for h in alert.hits for r in h.reasons}
        assert ("replaced" if form == "stem" else "read") in reasons
    # too late: the new file's content came more than LATE_PAIRING seconds after the delete
    w = World()
    paths = corpus(w)
    for p in paths[:10]:
        w.feed(Change(op="create", path=p + b".locked"))
        w.unlink(p)
        w.t += guard.LATE_PAIRING + 1
        w.put(p + b".locked", os.urandom(5000))
    assert w.det.score() == 0


def test_alert_round_trips_through_its_saved_state(tmp_path):
    w = World()
    for p in corpus(w):
        if w.put(p, enc(w.raw[w.old[p]])):
            break
    a = w.det.alert
    path = str(tmp_path / guard.STATE_FILE)
    guard.save_state(path, {"version": 1, "alert": a.to_dict(), "snapshot": "guard-x", "action": "block"})
    assert os.stat(path).st_mode & 0o777 == 0o600
    st = guard.load_state(path)
    b = guard.Alert.from_dict(st["alert"])
    assert b.to_dict() == a.to_dict() and st["snapshot"] == "guard-x"
    (tmp_path / "bad").write_text("{not json")
    assert guard.load_state(str(tmp_path / "bad")) is None
    assert guard.load_state(str(tmp_path / "missing")) is None


class Ctx:
    def __init__(self, pid):
        self.pid = pid


async def test_block_refuses_all_but_allowed_processes():
    b = guard.Block()
    with pytest.raises(PermissionError) as e:
        await b.check(Ctx(os.getppid()))
    assert e.value.errno == 1  # EPERM
    b.allow(os.getpid())
    await b.check(Ctx(os.getpid()))  # allowed
    import threading  # FUSE names the calling thread: a thread of an allowed process is allowed
    go, tid = threading.Event(), []
    t = threading.Thread(target=lambda: (tid.append(threading.get_native_id()), go.wait(10)))
    t.start()
    while not tid:
        time.sleep(0.001)
    try:
        assert tid[0] != os.getpid()
        await b.check(Ctx(tid[0]))
    finally:
        go.set()
        t.join()
    with pytest.raises(PermissionError):
        await b.check(Ctx(os.getppid()))
    assert b.status()["refused"] == 2 and b.status()["processes"][0]["pid"] == os.getppid()


def test_a_write_the_guard_cannot_see_clears_its_memory_and_renames_point_at_the_write():
    w = World()
    paths = corpus(w)
    p = paths[0]  # a .txt
    w.put(p, enc(w.raw[w.old[p]]))  # remembered as opaque
    w.det.resume()
    # a restore whose chunks were all known already (dedup): no head sample reaches the guard
    w.feed(Change(op="write", path=p, size=100, cause="write", base_seq=1, edit=[(0, 1, [(b"known", 100)])],
                  chunks=[]))
    assert p not in w.det.memory
    w.put(p, enc(TEXT[:3000]))
    assert w.det.hits and w.det.hits[-1].key == p  # scored again: the extension says text
    write_seq = w.seq
    w.det.hits.clear()
    w.det.memory[p] = (None, 7.9)  # even if the write scored nothing...
    w.put(p, enc(TEXT[:3000]))
    w.det.hits.clear()
    write_seq = w.seq
    w.rename(p, p + b".locked")
    (h,) = w.det.hits
    assert h.reasons == ("extension",) and h.seq == write_seq  # ...the attack on it began at the write


class FakeOps:
    guard_block = None
    guard_opens = None

    def child_path(self, parent, name):
        return name


async def test_block_paces_changes_while_suspicious_then_refuses():
    """Under --guard-action block, from SUSPECT of the threshold on, each change
    waits for capture (drain) so the attacker cannot outrun the guard."""
    w = World()
    ops = FakeOps()
    drained = []

    async def drain():
        drained.append(1)

    g = guard.Guard(w.det, None, None, action="block", ops=ops)
    g.drain = drain
    paths = corpus(w)

    def feed(*changes):  # through the Guard, as capture.Recorder does
        seqs = list(range(w.seq + 1, w.seq + 1 + len(changes)))
        w.seq += len(changes)
        g.observe(changes, seqs)
    w.feed = feed

    class Nursery:
        def start_soon(self, fn, *a):
            pass
    g.nursery = Nursery()
    assert ops.guard_block is None  # nothing suspicious yet: nothing installed
    for i, p in enumerate(paths):
        w.put(p, enc(w.raw[w.old[p]]))
        if i + 1 < 5:  # from the first damaged file on (SUSPECT of the threshold)
            assert ops.guard_block is not None and not ops.guard_block.blocking
            await ops.guard_block.check(Ctx(os.getppid()))  # paced, not refused
        else:
            break
    assert len(drained) == 4 and g.alerted and ops.guard_block.blocking
    with pytest.raises(PermissionError):
        await ops.guard_block.check(Ctx(os.getppid()))
    g.resume()
    assert ops.guard_block is None


async def test_pacing_ends_after_a_quiet_half_minute():
    """One suspicious file in ordinary work paces changes for PACE_QUIET seconds,
    not for the window's hour: the first request after that goes straight through
    and uninstalls the pacing Block."""
    w = World()
    ops = FakeOps()
    drained = []

    async def drain():
        drained.append(1)

    g = guard.Guard(w.det, None, NoNursery(), action="block", ops=ops)
    g.drain = drain
    p = corpus(w)[0]
    w.feed = lambda *ch: g.observe(ch, [0] * len(ch))
    w.put(p, enc(w.raw[w.old[p]]))
    assert ops.guard_block is not None and not ops.guard_block.blocking
    await ops.guard_block.check(Ctx(os.getppid()))
    assert drained == [1]  # paced: waited for capture
    w.t += guard.PACE_QUIET + 1
    await ops.guard_block.check(Ctx(os.getppid()))
    assert drained == [1] and ops.guard_block is None  # quiet: no wait, pacing gone
    assert w.det.score() >= guard.SUSPECT * w.det.threshold  # the hit still counts toward an alert


@pytest.mark.parametrize("action", ["alert", "block"])
def test_a_new_opaque_file_alone_paces_only_under_block(action):
    """gpg -c or a download writes a new file of random bytes: under block
    that paces the next half minute (an attacker's first write-new-then-
    delete-old steps), under alert it takes a second one (pip install after
    a gpg -c ran twice as long, paced file by file); a hit paces both."""
    w = World()
    ops = FakeOps()
    g = guard.Guard(w.det, None, NoNursery(), action=action, ops=ops)
    paths = corpus(w)
    w.feed = lambda *ch: g.observe(ch, [0] * len(ch))
    w.put(b"docs/backup.tar.gpg", os.urandom(20_000))
    assert w.det.fresh and w.det.score() == 0
    assert (ops.guard_block is not None) == (action == "block")
    w.put(b"docs/backup2.tar.gpg", os.urandom(20_000))
    assert ops.guard_block is not None  # two: both pace
    g._pace(False)
    w.t += guard.PACE_QUIET + 1
    assert not g.suspicious()
    w.put(paths[0], enc(w.raw[w.old[paths[0]]]))  # a damaged file: both pace
    assert ops.guard_block is not None and not ops.guard_block.blocking


def test_opens_are_drained_into_the_detector():
    w = World()
    ops = FakeOps()
    g = guard.Guard(w.det, None, None, ops=ops)
    g.opens.append((None, b"docs/a.txt"))
    g.observe([], [])
    assert b"docs/a.txt" in w.det.opened and not g.opens


class FakePipeline:
    """capture's committer, as the guard sees it: damaged files wait in
    ``pending`` until commit() hands them to Guard.observe in one batch
    (a group commit); drain() commits whatever is pending."""

    def __init__(self, w: World, g: guard.Guard):
        self.w, self.g, self.pending = w, g, []
        g.drain = self.drain

    def damage(self, p: bytes):
        self.pending.append(p)

    def commit(self):
        batch, self.pending = self.pending, []
        for p in batch:
            nc = self.w._chunk(enc(self.w.raw[self.w.old[p]]), self.w.old[p])
            self.w.old[p] = nc.id
            self.w.seq += 1
            size = self.w.raw[nc.id].__len__()
            self.g.observe([Change(op="write", path=p, size=size, cause="write", base_seq=1,
                                   edit=[(0, 1, [(nc.id, size)])], chunks=[nc])], [self.w.seq])

    async def drain(self):
        self.commit()


class NoNursery:
    def start_soon(self, fn, *a):  # _alerted pins a snapshot in a journal: none here
        pass


async def attack_until_refused(ops, pipe: FakePipeline, paths, batch: int) -> int:
    """The attacker: before each file, its change request asks the guard's Block
    (as ops does); every ``batch`` files capture commits them in one go."""
    import trio

    lost = 0
    for p in paths:
        if ops.guard_block is not None:
            try:
                await ops.guard_block.check(Ctx(os.getppid()))
            except PermissionError:
                break
        pipe.damage(p)
        lost += 1
        if len(pipe.pending) == batch:
            pipe.commit()
        await trio.sleep(0)
    return lost


async def test_block_mode_scores_in_the_committer_so_the_next_request_is_refused():
    """--guard-action block: the guard scores in the committer (not deferred),
    so the change request after a group commit that crosses the threshold is
    refused: 5 files of 1.0 each are lost, not 6.  Deferred scoring let the
    request that was waiting for the scoring through (it held the pacing
    Block that the scoring replaced)."""
    import trio

    w = World()
    ops = FakeOps()
    paths = corpus(w)
    g = guard.Guard(w.det, None, NoNursery(), action="block", ops=ops)
    pipe = FakePipeline(w, g)
    g.start_deferred()  # as guard_service does: a no-op under block
    async with trio.open_nursery() as nursery:
        if g.deferred:
            nursery.start_soon(g.scorer)
        with trio.fail_after(5):
            lost = await attack_until_refused(ops, pipe, paths, batch=5)
        nursery.cancel_scope.cancel()
    assert g.alerted and ops.guard_block.blocking
    assert lost == 5, f"{lost} files damaged before the block refused the next"
    assert ops.guard_block.status()["refused"] == 1


async def test_block_mode_paces_the_attacker_to_the_file_that_crosses():
    """Commits of up to 3 files at a time: pacing (from the first damaged file) keeps the attacker
    in step; exactly the 5 files that make the score are lost."""
    import trio

    w = World()
    ops = FakeOps()
    paths = corpus(w)
    g = guard.Guard(w.det, None, NoNursery(), action="block", ops=ops)
    pipe = FakePipeline(w, g)
    g.start_deferred()
    async with trio.open_nursery() as nursery:
        if g.deferred:
            nursery.start_soon(g.scorer)
        with trio.fail_after(5):
            lost = await attack_until_refused(ops, pipe, paths, batch=3)  # a lag of up to 3 files
        nursery.cancel_scope.cancel()
    assert lost == 5 and g.alerted and ops.guard_block.paced >= 1


async def test_deferred_scoring_runs_after_the_commit_and_settle_waits_for_it():
    """In a mount (--guard-action alert) the committer only queues each item
    (its fsync waiters are answered first); the scorer task scores it, and
    settle() returns only once everything queued is scored."""
    import trio

    w = World()
    ops = FakeOps()
    g = guard.Guard(w.det, None, NoNursery(), action="alert", ops=ops)

    async def drain():
        pass
    g.drain = drain
    g.start_deferred()
    assert g.deferred
    paths = corpus(w)

    def feed(*changes):
        seqs = list(range(w.seq + 1, w.seq + 1 + len(changes)))
        w.seq += len(changes)
        g.observe(changes, seqs)
    w.feed = feed

    async with trio.open_nursery() as nursery:
        for p in paths[:6]:
            w.put(p, enc(w.raw[w.old[p]]))
        assert len(g.unscored) == 6 and not g.alerted  # queued, not scored yet
        nursery.start_soon(g.scorer)
        with trio.fail_after(5):
            await g.settle()
        assert not g.unscored and g.alerted and ops.guard_block is None  # alert only: nothing refused
        nursery.cancel_scope.cancel()


async def test_alert_mode_paces_so_the_alert_comes_before_the_next_change():
    """--guard-action alert paces too (scoring deferred after each commit): a
    full-speed attacker whose files capture commits 3 at a time has damaged
    exactly the 5 files that make the score when the alert is raised, then
    goes on unrefused (alert only) and unpaced.  Without pacing it ran one
    commit (here 1, in a mount 4-6 files) past the crossing file."""
    import trio

    w = World()
    ops = FakeOps()
    paths = corpus(w)
    g = guard.Guard(w.det, None, NoNursery(), action="alert", ops=ops)
    pipe = FakePipeline(w, g)
    g.start_deferred()
    assert g.deferred
    damaged = 0
    async with trio.open_nursery() as nursery:
        nursery.start_soon(g.scorer)
        with trio.fail_after(5):
            for p in paths:
                if ops.guard_block is not None:
                    await ops.guard_block.check(Ctx(os.getppid()))  # never refused under alert
                if g.alerted:
                    break  # what the attacker had damaged when the alert was raised
                pipe.damage(p)
                damaged += 1
                if len(pipe.pending) == 3:
                    pipe.commit()
                await trio.sleep(0)
            assert g.alerted and ops.guard_block is None  # the alert ends the pacing; nothing is refused
            assert damaged == 5, f"{damaged} files damaged before the alert"
            for p in paths[damaged:damaged + 3]:  # the attack goes on: nothing waits for the guard now
                pipe.damage(p)
            await g.settle()
        assert w.det.damaged_since_alert == 3 and ops.guard_block is None
        nursery.cancel_scope.cancel()


async def test_the_scorer_keeps_no_reference_to_what_it_scored():
    """Issue 19, daemon memory: once scored, an item's changes (a content
    version's edit and chunk payloads) are not held by the scorer task
    until the next item comes."""
    import gc
    import weakref

    import trio

    class Tracked(list):
        pass

    w = World()
    g = guard.Guard(w.det, None, NoNursery(), action="alert", ops=FakeOps())

    async def drain():
        pass
    g.drain = drain
    g.start_deferred()
    paths = corpus(w)
    refs = []

    def feed(*changes):
        seqs = list(range(w.seq + 1, w.seq + 1 + len(changes)))
        w.seq += len(changes)
        tracked = Tracked(changes)
        refs.append(weakref.ref(tracked))
        g.observe(tracked, seqs)
    w.feed = feed

    async with trio.open_nursery() as nursery:
        nursery.start_soon(g.scorer)
        for p in paths[:3]:
            w.put(p, enc(w.raw[w.old[p]]))
        with trio.fail_after(5):
            await g.settle()
        gc.collect()
        assert refs and all(r() is None for r in refs)
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("action", ["alert", "block"])
async def test_resume_scores_what_came_before_it_under_the_old_alert(action):
    """Changes made before `deltafs guard resume` but committed or scored after
    it are the attack's tail: they count under the alert that stands
    (changes_since), and do not fill the new window and re-alert at once."""
    import trio

    w = World()
    ops = FakeOps()
    paths = corpus(w)
    g = guard.Guard(w.det, None, NoNursery(), action=action, ops=ops)
    pipe = FakePipeline(w, g)
    g.start_deferred()
    async with trio.open_nursery() as nursery:
        if g.deferred:
            nursery.start_soon(g.scorer)
        for p in paths[:6]:
            pipe.damage(p)
        pipe.commit()
        with trio.fail_after(5):
            await g.settle()
        assert g.alerted
        for p in paths[6:12]:  # six more files damaged: three committed (maybe unscored), three not yet
            pipe.damage(p)
            if len(pipe.pending) == 3:
                pipe.commit()
        with trio.fail_after(5):
            res = await g.resume_settled()
            await g.settle()
        assert res["cleared"]
        assert not g.alerted, "re-alerted at once by changes made before the resume"
        assert w.det.score() == 0 and not pipe.pending
        for p in paths[12:18]:  # an attack after the resume is a new one
            pipe.damage(p)
        pipe.commit()
        with trio.fail_after(5):
            await g.settle()
        assert g.alerted
        nursery.cancel_scope.cancel()


def test_text_that_starts_like_a_zlib_header_is_text():
    """"x alpha" begins with 0x78 0x20, a valid zlib header: the soak's word
    files that began so were typed zlib, and their next save scored a type
    change (a false alert after 25 minutes of ordinary edits)."""
    assert guard.type_of(b"x alpha alpha\n42\nfuse lorem ipsum journal") == "text"
    assert guard.type_of(zlib.compress(TEXT)) == "zlib"
    w = World()
    p = b"d11/n007878.txt"
    w.put(p, b"x alpha alpha\n42\n" + TEXT[:3000], cause="scan")
    assert w.put(p, b"soak gamma fuse 42\n" + TEXT[:3000]) is None
    assert not w.det.hits


def test_text_stored_raw_is_not_incompressible():
    """Capture stores chunks raw without trying after a run of incompressible
    ones (and zstd cannot shrink a chunk of a few hundred bytes): a text
    file's save whose chunks came out raw scores nothing when its head is
    plainly text, nor does a small raw chunk."""
    w = World()
    p = b"notes/todo.txt"
    w.put(p, TEXT[:6000], cause="scan")
    data = TEXT[100:6100]
    raw = chunking.NewChunk(chunking.chunk_id(data), len(data), b"\0" + data)
    w.raw[raw.id] = data
    w.feed(Change(op="write", path=p, size=len(data), cause="write", base_seq=1,
                  edit=[(0, 1, [(raw.id, len(data))])], chunks=[raw]))
    small = TEXT[:300]
    tail = chunking.NewChunk(chunking.chunk_id(small), len(small), b"\0" + small)
    w.feed(Change(op="write", path=b"notes/log.txt", size=len(small), cause="write", base_seq=1,
                  edit=[(1, 0, [(tail.id, len(small))])], chunks=[tail]))
    assert not w.det.hits, [h.to_dict() for h in w.det.hits]
    w.put(p, enc(data))  # the same file encrypted still scores in full
    assert w.det.hits and w.det.hits[-1].score == 1.0


async def test_quiet_items_wait_for_a_batch_and_urgent_ones_score_the_queue_at_once(autojump_clock):
    """Cost of the signals (docs/guard.md): committed items that cannot raise
    the score (new files of ordinary content, creates, deletes while no new
    opaque file is about) are not scored after every commit but in a batch,
    up to DEFER_S later; a damaged file's version is scored at once, after
    everything queued before it (in order); and whoever needs the score
    (flush, pacing) scores the queue itself without waiting for the batch."""
    import trio

    w = World()
    ops = FakeOps()
    paths = corpus(w)
    g = guard.Guard(w.det, None, NoNursery(), action="alert", ops=ops)
    g.start_deferred()

    def feed(*changes):
        seqs = list(range(w.seq + 1, w.seq + 1 + len(changes)))
        w.seq += len(changes)
        g.observe(changes, seqs)
    w.feed = feed

    async with trio.open_nursery() as nursery:
        nursery.start_soon(g.scorer)
        for i in range(20):  # new text files, their creates, a delete: quiet
            w.feed(Change(op="create", path=b"new/f%d.txt" % i))
            w.put(b"new/f%d.txt" % i, TEXT[i:] + b"%d\n" % i)
        w.unlink(b"new/f0.txt")
        await trio.sleep(guard.DEFER_S / 2)
        assert len(g.unscored) == 41 and w.det.observed < 41  # waiting for the batch
        await trio.sleep(guard.DEFER_S)
        assert not g.unscored and w.det.memory.get(b"new/f1.txt", (None,))[0] == "text"
        observed = w.det.observed

        w.put(b"new/g3.txt", TEXT[3:] + b"3\n")  # quiet: a new file again
        await trio.sleep(guard.DEFER_S / 10)
        assert len(g.unscored) == 1
        w.put(paths[1], enc(w.raw[w.old[paths[1]]]))  # a damaged PDF: urgent
        await trio.sleep(guard.DEFER_S / 10)
        assert not g.unscored and w.det.observed == observed + 2  # at once, with the item before it
        assert w.det.hits and w.det.hits[-1].key == paths[1]

        w.put(b"new/g4.txt", TEXT[4:] + b"4\n")
        w.feed(Change(op="create", path=b"new/x.txt"))
        assert len(g.unscored) == 2
        with trio.fail_after(guard.DEFER_S / 10):  # scored() scores the queue now
            await g.scored()
        assert not g.unscored and w.det.observed == observed + 4
        nursery.cancel_scope.cancel()


def test_which_items_are_urgent():
    """Guard._urgent: what may change the score is scored at once."""
    w = World()
    paths = corpus(w)
    g = guard.Guard(w.det, None, NoNursery(), action="alert", ops=FakeOps())
    g.unscored = [None]
    rng = random.Random(2)
    new_text = chunking.build_chunk(TEXT, None)
    new_random = chunking.build_chunk(rng.randbytes(20000), None)
    edit = chunking.build_chunk(TEXT + b"x", chunking.Base(w.old[paths[0]], w.raw[w.old[paths[0]]], 0))

    def write(nc, base_seq=0, replaced=0, cause="write"):
        return Change(op="write", path=b"a.txt", size=nc.raw_len, cause=cause, base_seq=base_seq,
                      edit=[(0, replaced, [(nc.id, nc.raw_len)])], chunks=[nc])

    assert not g._urgent([write(new_text)])
    assert g._urgent([write(new_random)])  # a new opaque file: it may pair with a delete
    assert not g._urgent([write(new_random, cause="scan")])
    assert g._urgent([write(edit, base_seq=1, replaced=1)])  # replaces content: any signal
    assert not g._urgent([Change(op="create", path=b"a.txt"), Change(op="unlink", path=b"b.pdf"),
                          Change(op="rename", path=b"a.txt", path2=b"b.txt")])
    assert g._urgent([Change(op="rename", path=b"a.pdf", path2=b"a.pdf.locked")])
    w.det.fresh[b"x"] = (w.t, 1, b"x")  # a new opaque file is about: a delete may be its pair
    assert g._urgent([Change(op="unlink", path=b"b.pdf")])
    w.det.fresh.clear()
    g._queued_bytes = guard.DEFER_BYTES
    assert g._urgent([Change(op="create", path=b"a.txt")])  # the payloads held are bounded
    g._queued_bytes = 0
    # a new file of incompressible bytes in a recognised format (git's zlib objects) is no
    # opaque file when its head is known: it waits for a batch; without its head it is urgent
    obj = zlib.compress(rng.randbytes(20000))
    new_obj = chunking.build_chunk(obj, None)
    assert new_obj.payload[:1] == b"\0"  # stored raw: what made it look opaque
    assert g._urgent([write(new_obj)])
    w.raw[new_obj.id] = obj
    assert not g._urgent([write(new_obj)])
    assert guard.write_signals(write(new_obj), w.raw.get, {}) == (0.0, [])
    del w.raw[new_obj.id]
    assert guard.write_signals(write(new_obj), w.raw.get, {}) == (0.25, ["opaque"])


def test_a_new_text_heads_entropy_bound_decides_as_the_count():
    """head_bound: a new text file's head entropy (remembered for its next save)
    is an upper bound no higher than 5.7 when its samples take few values, the
    count itself otherwise; and the next save scores the same either way."""
    rng = random.Random(3)
    for n in (1, 20, 51, 52, 120):
        head = bytes(rng.choice(range(32, 32 + n)) for _ in range(4096))
        b, e = guard.head_bound(head), guard.entropy(head[::16])
        assert b >= e - 1e-9 and (b <= 5.7 if len(set(head[::16])) <= 51 else b == e)
    for exact in (False, True):
        w = World()
        if exact:
            w.det.memory = {}
            orig = guard.head_bound
            guard.head_bound = lambda h: guard.entropy(h[:guard.HEAD:16])
        try:
            w.put(b"n/a.txt", TEXT)  # a new file
            w.put(b"n/a.txt", enc(TEXT))  # then encrypted in place
        finally:
            if exact:
                guard.head_bound = orig
        (h,) = w.det.hits
        if not exact:
            first = (h.score, h.reasons)
        else:
            assert (h.score, h.reasons) == first


def test_the_detectors_path_memories_stay_bounded_and_keep_the_newest():
    """memory, written and created drop their oldest entries in bulk once a
    tenth over their bound (trim_oldest): bounded, the newest kept, and no
    per-insert scan over deleted slots (~10 µs per new file at 20,000)."""
    d = {i: i for i in range(100)}
    guard.trim_oldest(d, 60)
    assert list(d) == list(range(40, 100))
    w = World()
    n = guard.PATHS_KEPT + guard.PATHS_KEPT // 10 + 5
    for i in range(n):
        p = b"many/f%d.txt" % i
        w.feed(Change(op="create", path=p))
        w.put(p, b"some text %d\n" % i)
    assert len(w.det.memory) <= guard.PATHS_KEPT + guard.PATHS_KEPT // 10
    assert len(w.det.written) <= guard.PATHS_KEPT + guard.PATHS_KEPT // 10
    assert len(w.det.created) <= 11_000
    last = b"many/f%d.txt" % (n - 1)
    assert last in w.det.memory and last in w.det.written and b"many/f0.txt" not in w.det.memory


def test_all_new_stops_at_the_first_old_chunk():
    """The "rewritten" signal asks whether every chunk of a file's list is new;
    a large file's list is read only up to its first old chunk."""
    new = [chunking.build_chunk(b"a" * 100, None), chunking.build_chunk(b"b" * 100, None)]
    ids = [(c.id, 100) for c in new]
    assert guard._all_new(ids, new)
    assert not guard._all_new(ids + [(b"\0" * 16, 5)], new)
    read = []

    def refs():
        for r in [(b"\1" * 16, 5), *ids]:
            read.append(r)
            yield r
    assert not guard._all_new(refs(), new) and len(read) == 1


VALID_HEADS = {
    "zip": b"PK\x03\x04\x14\x00\x00\x00", "png": b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR", "gzip": gzip.compress(b"x"),
    "jpeg": b"\xff\xd8\xff\xe0", "gif": b"GIF89a", "xz": b"\xfd7zXZ\x00", "zstd": b"\x28\xb5\x2f\xfd",
    "bzip2": b"BZh9", "7z": b"7z\xbc\xaf\x27\x1c", "pdf": b"%PDF-1.7", "sqlite": b"SQLite format 3\x00",
    "gitpack": b"PACK\0\0\0\2", "gitidx": b"\xfftOc\0\0\0\2", "elf": b"\x7fELF\2\1\1",
    "mp4": b"\0\0\0\x18ftypisom", "riff": b"RIFF\0\0\0\0WEBP", "zlib": zlib.compress(b"hello" * 50),
}


def test_format_of_by_first_byte_answers_as_every_check_in_order():
    """format_of tries only the checks a head's first byte allows (FIRST_BYTE):
    each check indeed needs that byte, and the answer is the first passing
    check in FORMATS order, as trying all of them gives."""
    def every(h):
        return next((n for n, c in guard.FORMATS.items() if c(h)), None)

    assert set(VALID_HEADS) == set(guard.FORMATS) == set(guard.FIRST_BYTE)
    for name, h in VALID_HEADS.items():
        assert guard.format_of(h) == name
        fb = guard.FIRST_BYTE[name]
        for b in range(256):
            if fb is not None and bytes([b]) != fb:
                assert not guard.FORMATS[name](bytes([b]) + h[1:]), (name, b)
    rng = random.Random(19)
    heads = [b"", b"x", b"x alpha", b"\0" * 4096, os.urandom(4096), chunking.__doc__.encode()]
    heads += [bytes([b]) + rng.randbytes(rng.randrange(0, 64)) for b in range(256) for _ in range(32)]
    heads += [bytes([b]) + h[1:] for h in VALID_HEADS.values() for b in range(256)]
    heads += [h[:k] for h in VALID_HEADS.values() for k in range(len(h))]
    for h in heads:
        assert guard.format_of(h) == every(h), h
