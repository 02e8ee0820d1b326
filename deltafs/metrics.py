"""``mount --metrics-addr HOST:PORT``: the mount's Prometheus text over HTTP at ``/metrics``.

The text is the one ``deltafs status --prometheus`` prints for this mount
(``status.prometheus``).  The HTTP server (``http.server``, a thread per
request) runs outside the trio loop and never calls into the daemon: the
service copies the daemon's status into a lock-protected slot every
``REFRESH_S`` seconds from the trio thread, and a scrape renders the latest
copy.  A scrape thus never waits for the FUSE loop, and sees numbers at
most ``REFRESH_S`` old (``deltafs_uptime_seconds`` is computed at scrape
time).

The address is bound before the mount reports ready: a port in use fails
the mount with one line (``check_addr`` tries it before any fork, too).
"""

from __future__ import annotations

import logging
import socket
import socketserver
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import trio

from deltafs.errors import MountError, UsageError

log = logging.getLogger(__name__)

REFRESH_S = 1.0  # seconds between status copies


def _show(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _resolve(host: str, port: int) -> tuple[int, tuple]:
    """-> (address family, sockaddr) of HOST:PORT; UsageError when HOST does not resolve."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise UsageError(f"bad --metrics-addr {_show(host, port)}: cannot resolve {host!r} "
                         f"({e.strerror})") from None
    fam, _, _, _, addr = infos[0]
    return fam, addr


class _Slot:
    """The latest status copy: written by the trio thread, read by HTTP threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._status: dict | None = None

    def put(self, st: dict) -> None:
        with self._lock:
            self._status = st  # a fresh dict each time, never mutated afterwards

    def get(self) -> dict | None:
        with self._lock:
            return self._status


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True  # a port left in TIME_WAIT by the last mount is free

    def server_bind(self) -> None:
        # HTTPServer.server_bind asks getfqdn (reverse DNS, may hang); not needed.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), self.server_address[1]


class _Handler(BaseHTTPRequestHandler):
    server_version = "deltafs"

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        from deltafs.status import prometheus

        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            st = self.server.slot.get()  # type: ignore[attr-defined]
            if st is None:
                return self._send(503, b"no status yet\n", "text/plain; charset=utf-8")
            if st.get("started"):
                st = {**st, "uptime_s": round(time.time() - st["started"], 3)}
            from prometheus_client.exposition import CONTENT_TYPE_LATEST

            return self._send(200, prometheus([st]), CONTENT_TYPE_LATEST)
        if path == "/":
            return self._send(200, b"deltafs: metrics at /metrics\n", "text/plain; charset=utf-8")
        return self._send(404, b"not found: try /metrics\n", "text/plain; charset=utf-8")

    def _send(self, code: int, body: bytes, ctype: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt: str, *args) -> None:
        log.debug("metrics %s: " + fmt, self.address_string(), *args)


def _bind(host: str, port: int) -> _Server:
    """Listen on HOST:PORT (blocking: name resolution); MountError when it cannot."""
    fam, addr = _resolve(host, port)
    cls = type("_Server", (_Server,), {"address_family": fam})
    try:
        return cls(addr[:2] if fam == socket.AF_INET else addr, _Handler)
    except OSError as e:
        raise MountError(f"cannot serve metrics on {_show(host, port)}: {e.strerror or e}") from None


def check_addr(host: str, port: int) -> None:
    """Before any fork: HOST resolves and PORT is free (the daemon binds it for real)."""
    _bind(host, port).server_close()


async def metrics_service(daemon, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Service: serve /metrics on cfg.metrics_addr until cancelled."""
    from deltafs.status import daemon_status

    host, port = daemon.cfg.metrics_addr
    srv = await trio.to_thread.run_sync(_bind, host, port)
    thread = None
    try:
        srv.slot = _Slot()
        srv.slot.put(await daemon_status(daemon))  # a scrape never finds the slot empty
        thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.2},
                                  name="deltafs-metrics", daemon=True)
        thread.start()
        log.info("metrics at http://%s/metrics", _show(host, port))
        task_status.started()
        failing = False
        while True:
            await trio.sleep(REFRESH_S)
            try:
                srv.slot.put(await daemon_status(daemon))
            except Exception as e:  # keep serving the last copy
                if not failing:
                    log.warning("metrics: cannot read the status (%s); serving the last one", e)
                failing = True
            else:
                if failing:
                    log.info("metrics: status readable again")
                failing = False
    finally:
        with trio.CancelScope(shield=True):
            if thread is not None:  # serve_forever runs: stop it (shutdown() waits for that)
                await trio.to_thread.run_sync(srv.shutdown)
            srv.server_close()
