"""The one wiring point: checks, journal, ops, services, ordered teardown.

``check_mount_args`` turns every bad-input case of a mount into one clear
DeltafsError before anything is touched.  ``spawn_daemon`` starts the
detached daemon and waits until MNT is usable.  ``run_daemon`` is the
daemon: it opens the journal (taking its lock), mounts, runs the FUSE loop
and the background services in one trio nursery, and on unmount or a
signal drains pending captures before it closes the journal.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import logging.handlers
import os
import resource
import shutil
import signal
import subprocess
import sys
import time

import pyfuse3
import trio

from deltafs import child_env, heap, mounttable
from deltafs._syscalls import set_bdi_readahead
from deltafs.config import MountConfig
from deltafs.errors import (DeltafsError, FuseUnavailableError, JournalError, MountError, NotMountedError,
                            UsageError)

log = logging.getLogger(__name__)

READY = b"READY\n"


def _inside(child: str, parent: str) -> bool:
    return child == parent or child.startswith(parent.rstrip("/") + "/")


def check_fuse() -> str:
    """Return the path of fusermount3, or say how to get FUSE.

    DELTAFS_DEV_FUSE names the device to look for (default /dev/fuse): tests
    point it at a missing path, the one way to cause "no /dev/fuse" for real.
    """
    dev = os.environ.get("DELTAFS_DEV_FUSE") or "/dev/fuse"
    if not os.path.exists(dev):
        raise FuseUnavailableError(
            f"no {dev}: load the fuse module (modprobe fuse), or run the container with --device /dev/fuse")
    fm = shutil.which("fusermount3")
    if fm is None:
        raise FuseUnavailableError("fusermount3 not found: install it with 'apt-get install fuse3'")
    return fm


def check_mount_args(src: str, mnt: str, journal: str | None) -> tuple[str, str, str]:
    """Validate SRC, MNT and the journal location; return their absolute paths."""
    if not os.path.exists(src):
        raise UsageError(f"SRC {src} does not exist")
    if not os.path.isdir(src):
        raise UsageError(f"SRC {src} is not a directory")
    src_r = os.path.realpath(src)
    mnt_a = os.path.abspath(mnt)
    entry = mounttable.mount_at(mnt_a)
    if entry is not None and entry.fstype.startswith("fuse"):
        what = "a deltafs mount" if entry.fstype == mounttable.FSTYPE else f"a {entry.fstype} mount"
        raise UsageError(f"MNT {mnt} is already {what} (of {entry.src}); unmount it first")
    if not os.path.lexists(mnt_a):
        raise UsageError(f"MNT {mnt} does not exist (create it with mkdir)")
    if not os.path.isdir(mnt_a):
        raise UsageError(f"MNT {mnt} is not a directory")
    mnt_r = os.path.realpath(mnt_a)
    if entry is not None or os.path.ismount(mnt_r):
        raise UsageError(f"MNT {mnt} is already a mount point")
    if mnt_r == src_r:
        raise UsageError(f"SRC and MNT are the same directory ({src_r}): mount SRC on an empty "
                         "directory outside it")
    if _inside(mnt_r, src_r):
        raise UsageError(f"MNT {mnt} is inside SRC {src}: choose a mount point outside it")
    if _inside(src_r, mnt_r):
        raise UsageError(f"SRC {src} is inside MNT {mnt}: choose a mount point outside it")
    try:
        if os.listdir(mnt_r):
            raise UsageError(f"MNT {mnt} is not empty")
    except PermissionError:
        raise UsageError(f"MNT {mnt} is not readable") from None
    j = os.path.abspath(journal) if journal else os.path.join(src_r, ".deltafs")
    j_r = os.path.realpath(j)
    if _inside(j_r, mnt_r):
        raise UsageError(f"journal {journal} is inside MNT {mnt}")
    if j_r == src_r:
        raise UsageError("the journal cannot be SRC itself")
    if os.path.lexists(j_r) and not os.path.isdir(j_r):
        raise UsageError(f"the journal {j} is not a directory")
    if not os.path.isdir(j_r) or not os.access(j_r, os.W_OK | os.X_OK):
        _check_writable(j_r, default=journal is None)
    mounttable.check_runtime_dir()  # ours alone, or a clear error now
    return src_r, mnt_r, j_r


def _check_writable(journal: str, default: bool) -> None:
    """A journal that cannot be created or written: one line, before anything starts."""
    from deltafs.journal import access_problem

    p = journal
    while not os.path.exists(p):
        p = os.path.dirname(p)
    if os.access(p, os.W_OK | os.X_OK):
        return
    why = access_problem(None, p)
    if default and "read-only" in why:
        why = "SRC's filesystem is read-only (give --journal DIR on a writable filesystem)"
    raise JournalError(f"cannot write the journal {journal}: {why}")


class PrivateLogFile(logging.handlers.RotatingFileHandler):
    """The daemon's log, mode 0600 whatever the umask: it names every path
    captured.  Rotations are renames of it, so they keep that mode."""

    def _open(self):
        fd = os.open(self.baseFilename, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        try:
            os.fchmod(fd, 0o600)  # also a log made before this rule
            return open(fd, self.mode, encoding=self.encoding, errors=self.errors)
        except BaseException:
            os.close(fd)
            raise


LOG_MAX_BYTES = 8 << 20
LOG_BACKUPS = 3


def _setup_logging(cfg: MountConfig) -> None:
    level = logging.DEBUG if cfg.debug else getattr(logging, cfg.log_level.upper(), logging.INFO)
    root = logging.getLogger()
    root.setLevel(level)
    if cfg.log_file:
        try:
            h: logging.Handler = PrivateLogFile(cfg.log_file, maxBytes=LOG_MAX_BYTES, backupCount=LOG_BACKUPS)
        except OSError as e:
            raise MountError(f"cannot write the log {cfg.log_file}: {e.strerror or e}") from None
    else:
        h = logging.StreamHandler(sys.stderr)
    h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.handlers[:] = [h]


def _raise_fd_limit() -> int:
    """Raise the soft descriptor limit to the hard one; -> the limit now in force.

    Cached inode descriptors then use at most a budget of it (fdcache.py)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (OSError, ValueError) as e:  # e.g. an infinite hard limit some kernels refuse
            log.info("descriptor limit left at %d: %s", soft, e)
    return soft


def spawn_daemon(cfg: MountConfig) -> None:
    """Start the daemon detached with ``cfg`` (MountConfig.to_argv); return once
    MNT is usable, or raise its error."""
    from deltafs.journal import make_journal_dir

    make_journal_dir(cfg.journal)  # mode 0700; its log goes there before the daemon opens it
    r, w = os.pipe()
    os.set_inheritable(w, True)
    log_file = os.path.join(cfg.journal, "deltafs.log")
    cmd = [sys.executable, "-m", "deltafs", *cfg.to_argv(), "--foreground", "--ready-fd", str(w),
           "--log-file", log_file]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, pass_fds=(w,), start_new_session=True,
                            cwd="/", env=child_env())
    os.close(w)
    with os.fdopen(r, "rb") as f:
        msg = f.readline()
        while msg.startswith(b"PROGRESS "):
            if sys.stderr.isatty():
                sys.stderr.write("\r" + msg[9:].decode(errors="replace").rstrip() + "\033[K")
                sys.stderr.flush()
            msg = f.readline()
        if sys.stderr.isatty():
            sys.stderr.write("\r\033[K")
    if msg == READY:
        return
    proc.wait(timeout=30)
    line = msg.decode(errors="replace").strip()
    if line.startswith("ERROR "):
        code, _, text = line[6:].partition(" ")
        err = DeltafsError(text)
        err.exit_code = int(code)
        raise err
    raise MountError(f"the deltafs daemon exited with status {proc.returncode} before mounting; "
                     f"see {log_file}")


def fuse_options(cfg: MountConfig) -> set[str]:
    opts = set(pyfuse3.default_options)  # default_permissions: the kernel checks access
    opts.add(f"fsname={cfg.src}")
    opts.add("subtype=deltafs")
    for o in cfg.fuse_options:
        for part in o.split(","):
            if part:
                opts.add(part)
    if cfg.debug:
        opts.add("debug")
    return opts


def run_daemon(cfg: MountConfig, ready_fd: int | None = None) -> int:
    """Mount and serve until unmounted or signalled.  Returns the exit status."""
    from deltafs.journal import Journal

    def fail(err: DeltafsError) -> int:
        if logging.getLogger().handlers:  # else logging's last resort would print it a second time
            log.error("%s", err)
        if ready_fd is not None:
            os.write(ready_fd, f"ERROR {err.exit_code} {err}\n".encode())
            os.close(ready_fd)
        else:
            print(f"deltafs: {err}", file=sys.stderr)
        return err.exit_code

    try:
        _setup_logging(cfg)
        check_fuse()
        mounttable.check_runtime_dir()
        journal = Journal.open(cfg.journal, create=True)
    except DeltafsError as e:
        return fail(e)
    cfg = _with_registered_mirrors(cfg, journal)
    try:
        return _serve(cfg, journal, ready_fd, fail)
    finally:
        journal.close()


def _with_registered_mirrors(cfg: MountConfig, journal) -> MountConfig:
    """Add the mirrors registered in the journal (`deltafs mirror add`) to --mirror's."""
    from deltafs.mirrors import registry

    with journal.reader() as r:
        extra = registry.configured(r)
    if not extra:
        return cfg
    urls = tuple(dict.fromkeys([*cfg.mirrors, *(m["url"] for m in extra)]))
    endpoint = cfg.endpoint_url or next((m["endpoint_url"] for m in extra if m.get("endpoint_url")), None)
    return dataclasses.replace(cfg, mirrors=urls, endpoint_url=endpoint)


def _limit_malloc_arenas() -> None:
    """One glibc malloc arena for the whole daemon (before any thread starts).

    By default each thread that allocates gets its own arena, and the
    capture workers' freed chunk buffers (16-64 KiB each, megabytes per
    capture) stay in theirs, unusable by the others: the daemon's RssAnon
    after a 256 MiB capture was 155-175 MiB with per-thread arenas and
    110-118 MiB with one, at the same CPU (docs/performance-notes.md).
    DELTAFS_MALLOC_ARENAS overrides (0: glibc's default)."""
    n = int(os.environ.get("DELTAFS_MALLOC_ARENAS", "1") or 0)
    if n > 0:
        heap.limit_arenas(n)
    # DELTAFS_MMAP_THRESHOLD=N: buffers of N bytes or more (a capture's 4 MiB read
    # windows, a big file's packed list and record) mapped apart and unmapped when
    # freed, not left as holes in the heap.  Off by default (MMAP_THRESHOLD 0,
    # glibc's dynamic threshold): at 1 MiB a 4 GiB write's peak RssAnon was ~15 MiB
    # lower but its capture ~25% slower (page faults of a fresh mapping per
    # window; docs/performance-notes.md, issue 19, ninth session)
    t = int(os.environ.get("DELTAFS_MMAP_THRESHOLD", str(MMAP_THRESHOLD)) or 0)
    if t > 0:
        heap.fix_mmap_threshold(t)


MMAP_THRESHOLD = 0  # see _limit_malloc_arenas


def _serve(cfg: MountConfig, journal, ready_fd, fail) -> int:
    from deltafs.capture import Recorder
    from deltafs.ops import Operations

    # No umask(0): the daemon's own files get explicit modes, and ops gives
    # new entries exactly the (caller-masked) mode the kernel passes.
    # Capture and commit threads run Python code; with the default 5 ms GIL
    # switch interval the FUSE loop could wait that long for every request.
    sys.setswitchinterval(float(os.environ.get("DELTAFS_SWITCH_INTERVAL", "0.0005")))
    _limit_malloc_arenas()
    fd_limit = _raise_fd_limit()
    jst = os.stat(cfg.journal)
    rec = Recorder(journal, cfg.src) if cfg.capture else None
    ops_class = Operations
    if cfg.history_dir:  # the history view in MNT's root (historyview.py)
        from deltafs import historyview

        try:
            historyview.check_free(cfg.src, cfg.history_dir)
        except DeltafsError as e:
            return fail(e)
        ops_class = historyview.HistoryOperations
    ops = ops_class(cfg.src, hidden=(jst.st_dev, jst.st_ino), timeout=cfg.timeout, recorder=rec,
                    fd_limit=fd_limit, fd_budget=cfg.fd_budget)
    if cfg.history_dir:
        shared = "allow_other" in {p for o in cfg.fuse_options for p in o.split(",")}
        ops.attach_view(journal, cfg.history_dir, shared=shared)
    log.info("descriptors: limit %d, up to %d cached for inodes, %d kept free",
             ops.fc.limit, ops.fc.budget, ops.fc.reserve)
    state = _RunState()
    profile = os.environ.get("DELTAFS_PROFILE")  # developers: cProfile stats of the daemon
    if os.environ.get("DELTAFS_TRACEMALLOC"):  # developers: heap snapshots (tools/bench/soak.py)
        _trace_heap(os.environ["DELTAFS_TRACEMALLOC"])
    try:
        if profile:
            import cProfile
            cProfile.runctx("trio.run(_main, cfg, journal, ops, rec, ready_fd, state, jst.st_ino)",
                            globals(), locals(), profile)
        else:
            trio.run(_main, cfg, journal, ops, rec, ready_fd, state, jst.st_ino)
    except KeyboardInterrupt:
        pass
    finally:
        if state.mounted:
            mounttable.remove_record(cfg.mnt)
            try:
                pyfuse3.close(unmount=True)
            except Exception:  # the kernel may already have unmounted it
                log.debug("pyfuse3.close", exc_info=True)
            log.info("unmounted %s", cfg.mnt)
    if state.error is not None:
        return fail(state.error)
    return 0


def _trace_heap(dirname: str, every_s: float = 60.0) -> None:
    """Developers: tracemalloc snapshots of the daemon, one every ``every_s``
    seconds, as DIRNAME/heap-NNN.snap (tracemalloc.Snapshot.load), and one
    at once whenever a file DIRNAME/now appears (it is removed): e.g. at the
    peak of a workload (tools/bench/bigmem.py)."""
    import threading
    import tracemalloc

    tracemalloc.start(8)
    now = os.path.join(dirname, "now")

    def dump() -> None:
        n = 0
        due = 0.0
        while True:
            asked = os.path.exists(now)
            if asked or time.monotonic() >= due:
                try:
                    tracemalloc.take_snapshot().dump(os.path.join(dirname, f"heap-{n:03d}.snap"))
                    with open(os.path.join(dirname, f"heap-{n:03d}.json"), "w") as f:
                        json.dump(heap.stats(), f)
                    if asked:
                        os.unlink(now)
                except OSError:
                    log.debug("heap snapshot", exc_info=True)
                n += 1
                due = time.monotonic() + every_s
            time.sleep(0.2)

    threading.Thread(target=dump, name="heap-snapshots", daemon=True).start()


READAHEAD_KIB = 1024  # = max_write: one read request per MiB of a sequential read


async def _raise_readahead(mnt: str, ops) -> None:
    """Let the kernel read ahead 1 MiB on this mount instead of 128 KiB.

    FUSE starts at the device default of 128 KiB, so a sequential read of
    a file is one request per 128 KiB, each a Python round trip; at 1 MiB it
    is 4x fewer requests (measured: 2,048 -> 514 reads of a 512 MiB file).
    The kernel caps read-ahead when it gets the INIT reply, so this waits
    for that.  The mount's device number comes from /proc/self/mountinfo:
    nothing here may touch the mount point (even a realpath() of it asks
    this very daemon: a deadlock before it serves).  Needs root; otherwise
    the default stays.
    """
    await ops.initialized.wait()
    try:  # mnt is already absolute and resolved (check_mount_args)
        set_bdi_readahead(mnt, READAHEAD_KIB)
    except OSError as e:
        log.debug("read-ahead of %s left at the default: %s", mnt, e)


@dataclasses.dataclass
class _RunState:
    """How far run_daemon's trio loop got: shared with the signal handler."""

    mounted: bool = False
    error: DeltafsError | None = None


def _finished_intents(cfg: MountConfig, journal) -> dict:
    """The sync group's applies that reached SRC before a crash (deltafs/sync/engine.py)."""
    from deltafs.sync.engine import finished_intents

    try:
        return finished_intents(journal.path, cfg.src)
    except Exception as e:  # noqa: BLE001 - an unreadable sync state: the service reports it
        log.warning("sync state of %s unreadable at mount: %s", journal.path, e)
        return {}


async def _main(cfg: MountConfig, journal, ops, rec, ready_fd, state, hidden_ino) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_signals, nursery, state)
        if rec is not None:
            await nursery.start(rec.run)

            def progress(msg: str) -> None:
                log.info("%s", msg)
                if ready_fd is not None:
                    os.write(ready_fd, f"PROGRESS {msg}\n".encode())

            tags = await trio.to_thread.run_sync(_finished_intents, cfg, journal)
            rec.pipe.origins.update(tags)  # a sync apply a crash cut short: journaled as a sync
            await rec.scan(ops, hidden_ino, progress)
            if tags:
                await rec.drain()
                for p in tags:
                    rec.pipe.origins.pop(p, None)
        try:
            pyfuse3.init(ops, cfg.mnt, fuse_options(cfg))
        except RuntimeError as e:
            state.error = MountError(f"cannot mount {cfg.mnt}: {e} (see the log for libfuse's reason)")
            nursery.cancel_scope.cancel()
            return
        state.mounted = True
        nursery.start_soon(_raise_readahead, cfg.mnt, ops)
        mounttable.write_record(cfg.mnt, {"pid": os.getpid(), "src": cfg.src, "mnt": cfg.mnt,
                                          "journal": cfg.journal, "started": time.time(),
                                          "mirrors": list(cfg.mirrors)})
        log.info("mounted %s at %s (journal %s)", cfg.src, cfg.mnt, cfg.journal)
        from deltafs.services import Daemon, start_all

        daemon = Daemon(cfg, journal, ops, rec, nursery, time.time())
        async with trio.open_nursery() as services:
            try:
                await start_all(daemon, services)
            except DeltafsError as e:  # e.g. --metrics-addr in use: fail the mount, not half-start
                state.error = e
            else:
                if ready_fd is not None:
                    os.write(ready_fd, READY)
                    os.close(ready_fd)
                await pyfuse3.main(min_tasks=2, max_tasks=16)
            services.cancel_scope.cancel()
        if rec is not None:
            with trio.move_on_after(120, shield=True) as scope:
                await rec.drain()
            if scope.cancelled_caught:
                log.error("gave up waiting for %d pending captures; the next mount rescans", rec.pending())
        nursery.cancel_scope.cancel()


async def _signals(nursery: trio.Nursery, state: _RunState) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as sigs:
        async for sig in sigs:
            if not state.mounted:
                log.info("signal %s before mounting: stopping", signal.Signals(sig).name)
                nursery.cancel_scope.cancel()
                return
            log.info("signal %s: unmounting", signal.Signals(sig).name)
            pyfuse3.terminate()
            return


def unmount(mnt: str, timeout: float = 120.0) -> None:
    """Unmount a deltafs mount and wait until its daemon has finished."""
    mnt_a = os.path.abspath(mnt)
    entry = mounttable.mount_at(mnt_a)
    if entry is None:
        entry = mounttable.mount_at(os.path.realpath(mnt_a)) if os.path.exists(mnt_a) else None
    if entry is None:
        raise NotMountedError(f"{mnt} is not mounted")
    if entry.fstype not in (mounttable.FSTYPE, mounttable.FSTYPE + "-past"):
        raise UsageError(f"{mnt} is not a deltafs mount (it is {entry.fstype})")
    rec = mounttable.read_record(entry.mnt) or {}
    if rec.get("src") != entry.src:  # left by an earlier mount at this MNT: its pid is not ours to wait for
        rec = {}
    pid = rec.get("pid")
    pidfd = None
    if pid:
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            pidfd = None
    fm = check_fuse()
    res = subprocess.run([fm, "-u", entry.mnt], capture_output=True, text=True)
    if res.returncode != 0:
        msg = res.stderr.strip().splitlines()[-1] if res.stderr.strip() else "fusermount3 failed"
        if "busy" in msg.lower():
            raise MountError(f"{mnt} is busy: close the files and shells using it, then retry")
        raise MountError(msg.removeprefix("fusermount3: "))
    if pidfd is not None:
        import select
        try:
            ready, _, _ = select.select([pidfd], [], [], timeout)
        finally:
            os.close(pidfd)
        if not ready:
            raise MountError(f"unmounted {mnt}, but its daemon (pid {pid}) is still finishing after "
                             f"{timeout:.0f}s")



def mount_at(args, cfg: MountConfig) -> int:
    """``deltafs mount --at WHEN SRC MNT`` / ``--at WHEN --journal DIR MNT``: a read-only past view
    (``args``: --at, --cache-size, --journal, --ready-fd; ``cfg``: the mount options it shares:
    foreground, log level, FUSE options)."""
    from deltafs import pastfs
    from deltafs.config import parse_size

    if args.at is None:
        raise UsageError("give SRC and MNT (MNT alone goes with --at WHEN --journal DIR)")
    if args.mnt is None:
        if args.journal is None:
            raise UsageError("give SRC and MNT, or --journal DIR and MNT")
        src, mnt = None, args.src
    else:
        src, mnt = args.src, args.mnt
    journal = os.path.abspath(args.journal or os.path.join(src, ".deltafs"))
    if not os.path.exists(os.path.join(journal, "data.mdb")):
        raise UsageError(f"no deltafs journal at {journal}")
    mnt = os.path.abspath(mnt)
    if not os.path.isdir(mnt):
        raise UsageError(f"{mnt} is not a directory")
    if mounttable.mount_at(mnt) is not None:
        raise UsageError(f"{mnt} is already a mount point")
    cache = parse_size(args.cache_size, "--cache-size") if args.cache_size else pastfs.DEFAULT_CACHE
    if args.ready_fd is None:
        check_fuse()
    if cfg.foreground or args.ready_fd is not None:
        if cfg.foreground:
            logging.basicConfig(level=cfg.log_level, format="%(asctime)s %(levelname)s %(message)s")
        return pastfs.serve(journal, args.at, mnt, cache_size=cache, options=tuple(cfg.fuse_options),
                            ready_fd=args.ready_fd)
    pastfs.fork_serve(journal, args.at, mnt, cache_size=cache, options=tuple(cfg.fuse_options),
                      log_path=os.path.join(journal, "past-view.log") if os.access(journal, os.W_OK) else None,
                      log_level=cfg.log_level)
    return 0
