"""The control socket of a mount: server (in the daemon) and client (the CLI).

``JOURNAL/control.sock`` is a UNIX stream socket, mode 0600 from the moment
it exists (bound under umask 0177).  The protocol is JSON Lines: each
request ``{"op": "...", ...}`` gets one response ``{"ok": true, ...}`` or
``{"ok": false, "error": "...", "code": N}`` (N: the exit code the CLI
uses).  Several requests may share one connection.  Only the daemon's uid
or root is served (SO_PEERCRED); anyone else gets one refusal and is
disconnected.  docs/cli.md, "Control socket", lists the operations.

The daemon stays the single journal writer: commands that change a
running mount's journal (snapshot) are carried out by the daemon.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import struct
import time
from typing import Any, Awaitable, Callable

from deltafs import snapshots
from deltafs.errors import EXIT_DAEMON, EXIT_USAGE, DaemonError, DeltafsError, UsageError

log = logging.getLogger(__name__)

SOCKET_NAME = "control.sock"
MAX_REQUEST = 64 << 10  # bytes of one request line
_SUN_PATH_MAX = 107  # sockaddr_un.sun_path, less the terminating NUL


class DaemonNotRunning(DaemonError):
    """Nobody listens on the control socket (not mounted, or the daemon died)."""


def socket_path(journal_dir: str) -> str:
    return os.path.join(journal_dir, SOCKET_NAME)


class _ShortPath:
    """A path to name in bind/connect: long ones go through /proc/self/fd/N of the directory."""

    def __init__(self, path: str) -> None:
        self.fd = None
        self.path = path
        if len(os.fsencode(path)) > _SUN_PATH_MAX:
            self.fd = os.open(os.path.dirname(path), os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            self.path = f"/proc/self/fd/{self.fd}/{os.path.basename(path)}"

    def __enter__(self) -> str:
        return self.path

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)


def peer_uid(sock: socket.socket) -> int:
    _pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                          struct.calcsize("3i")))
    return uid


# ---- server (runs in the daemon's trio loop) -----------------------------------

def _bind(path: str) -> socket.socket:
    """Listen on path, mode 0600 from its creation (a blocking bind on the loop
    thread: no FUSE handler runs while the umask is narrowed)."""
    try:
        os.unlink(path)  # left by a daemon that died; we hold the journal lock
    except FileNotFoundError:
        pass
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        with _ShortPath(path) as p:
            old = os.umask(0o177)
            try:
                s.bind(p)
            finally:
                os.umask(old)
        s.listen(16)
    except BaseException:
        s.close()
        raise
    return s


class ControlServer:
    """The control socket service's handle (and what each op gets as ``server``):
    where it listens, how it gets the mount's status, and the lock that keeps
    pause and resume from interleaving."""

    def __init__(self, path: str, status: Callable[[Any], Awaitable[dict]]) -> None:
        import trio

        self.path = path
        self.status = status
        self.lock = trio.Lock()


async def serve(daemon, status: Callable[[Any], Awaitable[dict]], task_status=None) -> None:
    """Service: answer control requests until cancelled; removes the socket on exit.

    ``status(daemon)`` gives the ``status`` op's answer (status.daemon_status:
    passed in, so this module does not import the one that uses its client).
    Hands its :class:`ControlServer` to ``task_status.started``."""
    import trio

    path = socket_path(daemon.cfg.journal)
    try:
        raw = _bind(path)
    except OSError as e:
        from deltafs.errors import MountError
        raise MountError(f"cannot create the control socket {path}: {e.strerror or e}") from e
    st = os.stat(path)
    server = ControlServer(path, status)
    log.info("control socket %s", path)
    try:
        await _serve(daemon, server, trio.socket.from_stdlib_socket(raw),
                     task_status or trio.TASK_STATUS_IGNORED)
    finally:
        raw.close()
        try:
            cur = os.stat(path)
            if (cur.st_dev, cur.st_ino) == (st.st_dev, st.st_ino):
                os.unlink(path)
        except OSError:
            pass


_SHORT = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


async def _serve(daemon, server, sock, task_status) -> None:
    """Accept connections until cancelled; descriptors running short never stops it.

    trio.serve_listeners logs an ERROR with a traceback and sleeps 0.1 s on
    every EMFILE, forever, while the pending connection stays unanswered.
    Here the daemon first closes descriptors it only caches (ops.shed) and
    accepts again at once; only when nothing could be freed does it wait.
    """
    import trio

    async with trio.open_nursery() as nursery:
        task_status.started(server)
        waiting = False
        while True:
            try:
                conn, _ = await sock.accept()
            except OSError as e:
                if e.errno not in _SHORT:
                    raise
                shed = getattr(daemon.ops, "shed", None)
                if shed is None or not shed("the control socket could not accept a connection"):
                    if not waiting:
                        log.warning("the control socket cannot accept connections: %s; retrying",
                                    os.strerror(e.errno))
                    waiting = True
                    await trio.sleep(0.1)
                continue
            if waiting:
                log.info("the control socket accepts connections again")
                waiting = False
            nursery.start_soon(_handle, daemon, server, trio.SocketStream(conn))


async def _handle(daemon, server, stream) -> None:
    import trio

    try:
        async with stream:
            uid = peer_uid(stream.socket)
            if uid not in (0, os.getuid()):
                log.warning("refused a control connection from uid %d", uid)
                await stream.send_all(_encode({"ok": False, "code": EXIT_DAEMON,
                                               "error": f"permission denied: uid {uid} does not "
                                                        f"own this mount"}))
                return
            buf = b""
            while True:
                data = await stream.receive_some(65536)
                if not data:
                    return
                buf += data
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    if line.strip():
                        await stream.send_all(_encode(await _dispatch(daemon, server, line)))
                if len(buf) > MAX_REQUEST:
                    await stream.send_all(_encode({"ok": False, "code": EXIT_USAGE,
                                                   "error": "request too long"}))
                    return
    except (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError):
        pass  # the client went away
    except Exception:  # never let one connection take the mount down
        log.exception("control connection failed")


def _encode(d: dict) -> bytes:
    return json.dumps(d, ensure_ascii=False).encode() + b"\n"


async def _dispatch(daemon, server, line: bytes) -> dict:
    req = None
    try:
        req = json.loads(line)
        if not isinstance(req, dict) or not isinstance(req.get("op"), str):
            raise UsageError('a request is a JSON object with an "op" string')
        fn = _OPS.get(req["op"])
        if fn is None:
            raise UsageError(f"unknown op {req['op']!r} (known: {', '.join(sorted(_OPS))})")
        try:
            out = await fn(daemon, server, req)
        except OSError as e:  # descriptors ran short: free cached ones, then once more
            shed = getattr(daemon.ops, "shed", None)
            if e.errno not in _SHORT or shed is None or not shed(f"a control request ({req['op']})"):
                raise
            out = await fn(daemon, server, req)
        return {"ok": True, **out}
    except DeltafsError as e:
        return {"ok": False, "error": str(e), "code": e.exit_code}
    except ValueError as e:
        return {"ok": False, "error": f"bad request: {e}", "code": EXIT_USAGE}
    except Exception as e:  # the request may carry a mirror key: log its op only
        op = req.get("op") if isinstance(req, dict) else None
        log.exception("control request %r failed", op if op is not None else "<unparsed>")
        return {"ok": False, "error": f"internal error: {e}", "code": EXIT_DAEMON}


def _recorder(daemon):
    if daemon.rec is None:
        raise UsageError(f"capture is off for {daemon.cfg.mnt} (mounted with --no-capture)")
    return daemon.rec


async def _op_status(daemon, server, req) -> dict:
    return {"status": await server.status(daemon)}


async def _op_flush(daemon, server, req) -> dict:
    t0 = time.monotonic()
    if daemon.rec is not None:
        await daemon.rec.drain()
        if daemon.services.guard is not None:  # and the guard has scored it (deferred: after the commit)
            await daemon.services.guard.scored()
    out: dict = {}
    if req.get("mirrors"):  # then every mirror ships what is journaled now (MirrorError if one cannot)
        mirrors = daemon.services.mirrors
        out["mirrors"] = [await w.flush() for w in mirrors]
        await _check_registered_replicated(daemon, mirrors)
    return {"seconds": round(time.monotonic() - t0, 3), **out}


async def _check_registered_replicated(daemon, mirrors) -> None:
    """A mirror registered (mirror add) after this mount started gets nothing
    from it: flush --mirrors cannot promise it holds anything."""
    import trio

    from deltafs.errors import MirrorError
    from deltafs.mirrors import registry

    def registered() -> list[str]:
        with daemon.journal.reader() as r:
            return [m["url"] for m in registry.configured(r)]

    for url in await trio.to_thread.run_sync(registered):
        if url not in mirrors and url not in daemon.cfg.mirrors:
            raise MirrorError(f"mirror {url} is registered, but this mount does not replicate to it (it was "
                              f"added after mounting): remount, or ship it now with deltafs mirror sync {url}")


def _mirror_pause(daemon, req, pause: bool) -> dict | None:
    """``pause --mirror URL`` / ``resume --mirror URL``: that mirror's uploads, not capture."""
    url = req.get("mirror")
    if url is None:
        return None
    if not isinstance(url, str):
        raise UsageError('"mirror" must be a mirror URL string')
    w = daemon.services.mirrors.find(url)
    was = w.pause() if pause else w.resume()
    return {"mirror": w.url, "paused": pause, "was_paused": was}


async def _op_pause(daemon, server, req) -> dict:
    mirror = _mirror_pause(daemon, req, True)
    if mirror is not None:
        return mirror
    rec = _recorder(daemon)
    async with server.lock:
        was = rec.paused
        rec.paused = True
        await rec.drain()  # what happened before the pause is durable
        if not was:
            log.info("capture paused")
    return {"paused": True, "was_paused": was}


async def _op_resume(daemon, server, req) -> dict:
    mirror = _mirror_pause(daemon, req, False)
    if mirror is not None:
        return mirror
    rec = _recorder(daemon)
    async with server.lock:
        if not rec.paused:
            return {"paused": False, "was_paused": False, "rescan": None}
        counts = await rec.resume(daemon.ops, daemon.ops.hidden_ino)
        log.info("capture resumed; rescan recorded %s", counts)
    return {"paused": False, "was_paused": True, "rescan": counts}


async def _op_snapshot(daemon, server, req) -> dict:
    import trio

    name = req.get("name")
    if not isinstance(name, str):
        raise UsageError('snapshot needs a "name" string')
    snapshots.check_name(name)
    if daemon.rec is not None:
        await daemon.rec.drain()  # the snapshot holds every save made before it
    snap = await trio.to_thread.run_sync(snapshots.make, daemon.journal, name)
    log.info("snapshot %r at version %d", name, snap["seq"])
    return {"snapshot": snap}


async def _op_snapshots(daemon, server, req) -> dict:
    import trio

    def read():
        with daemon.journal.reader() as r:
            return snapshots.listing(r)
    return {"snapshots": await trio.to_thread.run_sync(read)}


async def _op_mirror_register(daemon, server, req) -> dict:
    """mirror add/remove while mounted: the daemon writes the journal setting."""
    import trio

    from deltafs.mirrors import registry

    url = req.get("url")
    if not isinstance(url, str):
        raise UsageError('mirror add/remove needs a "url" string')
    if req.get("remove"):
        changed = await trio.to_thread.run_sync(registry.remove, daemon.journal, url)
        return {"changed": changed, "active": url in daemon.services.mirrors}
    key = req.get("key")  # an encrypted mirror's unwrapped data key (this socket serves our uid only)
    if key is not None:
        from deltafs.mirrors.keys import KeyStore, key_from_wire

        await trio.to_thread.run_sync(KeyStore(daemon.cfg.journal).save, url, key_from_wire(key))
    changed = await trio.to_thread.run_sync(registry.add, daemon.journal, url, req.get("endpoint_url"))
    mirrors = daemon.services.mirrors
    started = False
    if mirrors.can_add and (key is not None or url not in mirrors):
        await mirrors.add(url)  # replicate at once
        started = True
    return {"changed": changed, "active": url in mirrors, "started": started}


async def _op_compact(daemon, server, req) -> dict:
    """deltafs compact while mounted: one pass by the daemon, the journal's
    only writer (``--vacuum`` needs the journal closed: refused)."""
    import trio

    from deltafs import maintenance
    from deltafs.config import RetentionPolicy, retention_from_args
    from deltafs.errors import JournalLockedError

    if req.get("vacuum"):
        raise JournalLockedError(f"compact --vacuum needs the journal unmounted: {daemon.cfg.mnt} is "
                                 "mounted on it (stop the mount with deltafs umount, then run it again)")
    for k in ("retention", "coalesce"):
        if req.get(k) is not None and not isinstance(req[k], str):
            raise UsageError(f'"{k}" must be a string')
    if not req.get("dry_run"):
        from deltafs.guard import holding, refuse_compaction_while_alerted

        if holding(daemon.services.guard):  # the background passes are held too (maintenance)
            refuse_compaction_while_alerted(daemon.journal.path, daemon.cfg.mnt)
    if req.get("retention") is not None or req.get("coalesce") is not None:
        policy = retention_from_args(req.get("retention"), req.get("coalesce"))
    else:  # the mount's own policy
        policy = getattr(daemon.cfg, "retention", None) or RetentionPolicy()
    rep = await trio.to_thread.run_sync(maintenance.compact, daemon.journal, policy, bool(req.get("dry_run")))
    log.info("compaction requested through the control socket: pruned %d versions, freed %d chunks (%d bytes)",
             rep.versions_pruned, rep.chunks_freed, rep.bytes_freed)
    return {"report": rep.to_dict()}


async def _op_guard(daemon, server, req) -> dict:
    """``{"op": "guard", "action": "status"|"resume"|"allow", "pid": N}`` (deltafs guard; docs/guard.md)."""
    g = daemon.services.guard
    s = daemon.services.sync  # the incoming guard of a sync group holds peers until resume too
    released = await s.guard_resume() if req.get("action") == "resume" and s is not None else None
    if g is None:
        if released is not None:
            return {"guard": {"cleared": bool(released), "sync_released": released}}
        raise UsageError(f"the guard is off for {daemon.cfg.mnt} (mounted with --guard off or --no-capture)")
    if req.get("action") == "resume":
        return {"guard": {**await g.resume_settled(), **g.status(),
                          **({"sync_released": released} if released else {})}}
    if req.get("action") == "allow":  # deltafs rollback while --guard-action block refuses changes
        if not isinstance(req.get("pid"), int):
            raise UsageError('guard allow needs a "pid" number')
        return {"guard": {**g.allow(req["pid"]), **g.status()}}
    return {"guard": g.status()}


async def _op_group(daemon, server, req) -> dict:
    """Sync group: a pass now, or a resolve in one (deltafs/sync/service.py)."""
    g = daemon.services.sync
    if g is None:
        raise UsageError("this mount is in no sync group (`deltafs group join URL` on the unmounted tree, "
                         "then mount it)")
    if req.get("action") in ("pause", "resume"):
        return await g.set_paused(req["action"] == "pause")
    if req.get("action") == "resolve":
        paths = [os.fsencode(p) for p in (req.get("paths") or [req["path"]])]
        take = str(req["take"])
        keep_going = bool(req.get("keep_going"))
        from deltafs.sync import resolve_each

        rep = await g.run(lambda eng: resolve_each(eng, paths, take, keep_going))
        done = rep.get("result") or []
        return {"report": {k: v for k, v in rep.items() if k != "result"}, "resolved": done[0] if done else None,
                "all": done}
    return {"report": await g.run()}


_OPS = {"group": _op_group, "guard": _op_guard, "status": _op_status, "flush": _op_flush, "pause": _op_pause, "resume": _op_resume,
        "snapshot": _op_snapshot, "snapshots": _op_snapshots, "mirror_register": _op_mirror_register,
        "compact": _op_compact}


# ---- client (blocking; used by the CLI) ------------------------------------------

def request(journal_dir: str, op: str, timeout: float | None = 30.0, **fields) -> dict:
    """One request to the daemon of the journal at journal_dir -> the response
    (without "ok").  DaemonNotRunning when nobody listens, DaemonError when it
    does not answer in time, the daemon's error (with its exit code) otherwise."""
    path = socket_path(journal_dir)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        s.settimeout(timeout)
        try:
            with _ShortPath(path) as p:
                s.connect(p)
        except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError):
            raise DaemonNotRunning(f"no deltafs daemon listens on {path}") from None
        except PermissionError:
            raise DaemonError(f"permission denied on {path}: only the user who mounted it "
                              "(or root) may control this mount") from None
        try:
            s.sendall(_encode({"op": op, **fields}))
            buf = b""
            while not buf.endswith(b"\n"):
                data = s.recv(1 << 20)
                if not data:
                    raise DaemonError(f"the deltafs daemon closed {path} without answering")
                buf += data
        except socket.timeout:
            raise DaemonError(f"the deltafs daemon did not answer {op!r} within {timeout:.0f}s "
                              f"({path})") from None
        except ConnectionError as e:
            raise DaemonError(f"lost the connection to the deltafs daemon ({path}): {e}") from None
    finally:
        s.close()
    resp = json.loads(buf)
    if not resp.get("ok"):
        err = DeltafsError(resp.get("error") or "the daemon refused the request")
        err.exit_code = int(resp.get("code") or EXIT_DAEMON)
        raise err
    resp.pop("ok", None)
    return resp
