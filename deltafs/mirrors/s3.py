"""s3:// mirrors: AWS S3 and S3-compatible servers (MinIO, Ceph RGW, Garage,
SeaweedFS).

* Credentials, region and endpoint come from boto3's standard chain
  (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN``,
  ``AWS_PROFILE``, ``~/.aws/config`` and ``~/.aws/credentials``, SSO,
  instance roles; ``AWS_ENDPOINT_URL``/``AWS_ENDPOINT_URL_S3``).  An explicit
  ``endpoint_url`` wins over the environment.  Region defaults to us-east-1.
* Path-style addressing when an endpoint is given (self-hosted servers
  rarely have wildcard DNS); virtual-hosted style on AWS.
* Every object is one PutObject with a Content-MD5, so a body corrupted on
  the way is refused by the server (every S3-compatible server checks it;
  the newer CRC trailers are not universally supported, so they are off).
* Bounded connect/read timeouts and at most two attempts per call inside
  boto (``total_max_attempts``: boto's ``max_attempts`` does not count the
  first attempt), so a hung server fails a call within about a minute:
  the replicator does its own backoff with jitter and a circuit breaker,
  and bounds each call's total time (replicate.py).  A timeout is a
  :class:`MirrorTimeout`.  ``on_progress``, when set, is called as the
  HTTP layer takes each piece of a PUT body, so a slow upload is told
  from a stalled one.
* ``put_if_absent`` sends ``If-None-Match: *`` (AWS since 2024, MinIO,
  SeaweedFS, recent Ceph RGW and Garage).  A server that answers it with
  501/NotImplemented is remembered, and from then on we fall back to a
  best-effort HEAD-then-PUT (a concurrent writer between the two can be
  overwritten; deltafs objects are content-named, so that is normally the
  same bytes).  A server that silently ignores the header cannot be
  detected; ``put_if_absent`` still HEADs first when ``conditional_writes``
  is False.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import io
import logging
import os
import socket
from collections.abc import Callable, Iterator
from typing import Any, NoReturn
from urllib.parse import urlsplit, urlunsplit

from deltafs.errors import MirrorError

from .base import (
    Mirror,
    MirrorAccessDenied,
    MirrorNotFound,
    MirrorObjectMissing,
    MirrorTimeout,
    MirrorUnreachable,
    check_range,
    validate_name,
    validate_prefix,
)

log = logging.getLogger(__name__)

DEFAULT_REGION = "us-east-1"
CONNECT_TIMEOUT = 5.0
READ_TIMEOUT = 30.0  # seconds without a byte from the server (each socket read or write)
MAX_ATTEMPTS = 2  # attempts per call in all (one retry); the replicator backs off itself

_CREDENTIAL_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken", "TokenRefreshRequired", "InvalidClientTokenId", "AuthorizationHeaderMalformed"}
_TRANSIENT_CODES = {"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "RequestTimeTooSkewed", "ConditionalRequestConflict", "OperationAborted", "503", "500", "502", "504"}
_NOT_IMPLEMENTED_CODES = {"NotImplemented", "501"}


def redact_url(url: str) -> str:
    """``url`` without any user:password part."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<malformed URL>"
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """exc, then what caused it (botocore keeps the cause in ``kwargs["error"]``)."""
    from botocore import exceptions as bx

    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        nxt = getattr(e, "kwargs", {}).get("error") if isinstance(e, bx.BotoCoreError) else None
        e = nxt if isinstance(nxt, BaseException) else (e.__cause__ or e.__context__)


def _timed_out(exc: BaseException) -> bool:
    from botocore import exceptions as bx

    return any(isinstance(e, bx.ConnectTimeoutError | bx.ReadTimeoutError | TimeoutError | socket.timeout)
               for e in _causes(exc))


def _network_reason(exc: BaseException, connect_timeout: float, read_timeout: float) -> str:
    """A short human reason ('connection refused', 'timed out after 5s') for a
    botocore/urllib3 network exception, found by walking its causes."""
    from botocore import exceptions as bx

    for e in _causes(exc):
        if isinstance(e, bx.ConnectTimeoutError):
            return f"connection timed out after {connect_timeout:g}s"
        if isinstance(e, bx.ReadTimeoutError):
            return f"no answer within {read_timeout:g}s"
        if isinstance(e, socket.gaierror):
            return "cannot resolve host name"
        if isinstance(e, ConnectionRefusedError):
            return "connection refused"
        if isinstance(e, ConnectionResetError):
            return "connection reset by the server"
        if isinstance(e, TimeoutError | socket.timeout):
            return "timed out"
        if isinstance(e, OSError) and e.errno:
            if e.errno == errno.ECONNREFUSED:
                return "connection refused"
            if e.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
                return "host unreachable"
            return e.strerror or os.strerror(e.errno)
        if isinstance(e, bx.SSLError):
            return "TLS error: " + _one_line(str(e.kwargs.get("error", e)), 120)
    text = str(exc)
    if "refused" in text.lower():
        return "connection refused"
    return _one_line(text, 120)


class _Body(io.BytesIO):
    """A PUT body that reports each piece the HTTP layer reads from it."""

    def __init__(self, data: bytes, tick: Callable[[int], None]) -> None:
        super().__init__(data)
        self._tick = tick

    def read(self, size: int | None = -1) -> bytes:
        b = super().read(size)
        if b:
            self._tick(len(b))
        return b


def _no_expect(params: dict, **_: Any) -> None:
    """botocore asks for ``Expect: 100-continue`` when a body is a file
    object (ours is, for progress): keep the request as it is for bytes."""
    params.get("headers", {}).pop("Expect", None)


class S3Mirror(Mirror):
    """A mirror in an S3 bucket, optionally under a key prefix."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        session: Any = None,
        conditional_writes: bool | None = None,
        connect_timeout: float = CONNECT_TIMEOUT,
        read_timeout: float = READ_TIMEOUT,
        max_attempts: int = MAX_ATTEMPTS,
    ) -> None:
        try:
            import boto3
            from botocore.config import Config
        except ImportError:  # pragma: no cover - boto3 is a dependency
            raise MirrorError("s3:// mirrors need boto3: pip install boto3") from None
        prefix = prefix.strip("/")
        if prefix:
            validate_prefix(prefix + "/")
        self.bucket = bucket
        self.prefix = prefix
        self._key_base = prefix + "/" if prefix else ""
        #: None = try If-None-Match and learn; True = always; False = HEAD-then-PUT.
        self.conditional_writes = conditional_writes
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout

        session = session or boto3.session.Session()
        region = region or session.region_name or DEFAULT_REGION
        endpoint_url = endpoint_url or None
        # Path style for self-hosted endpoints (given here or via the
        # AWS_ENDPOINT_URL* environment); "auto" lets boto pick on AWS.
        env_endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        addressing = "path" if (endpoint_url or env_endpoint) else "auto"
        config = Config(
            region_name=region,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            retries={"total_max_attempts": max_attempts, "mode": "standard"},
            s3={"addressing_style": addressing},
            # Content-MD5 on every PUT instead of CRC trailers, which many
            # S3-compatible servers do not understand.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            max_pool_connections=16,
            user_agent_extra="deltafs",
        )
        try:
            self._client = session.client("s3", endpoint_url=endpoint_url, config=config)
        except ValueError as e:  # bad endpoint URL
            raise MirrorError(f"invalid S3 endpoint URL {redact_url(endpoint_url or '')}: {_one_line(str(e), 120)}") from None
        except Exception as e:
            raise MirrorError(f"cannot configure S3 client: {_one_line(str(e), 160)}") from None
        self._client.meta.events.register_last("before-call.s3", _no_expect)  # after boto adds it
        self.endpoint_url = redact_url(self._client.meta.endpoint_url)
        self.region = region
        #: called with a byte count as each piece of a PUT body is sent (the replicator's stall detection)
        self.on_progress: Callable[[int], None] | None = None

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def _key(self, name: str) -> str:
        return self._key_base + validate_name(name)

    # -- error mapping -------------------------------------------------------

    def _raise(self, exc: Exception, op: str, name: str | None = None) -> NoReturn:
        """Translate a boto exception into one MirrorError line, and raise it."""
        from botocore import exceptions as bx

        what = f"{op} {name}" if name else op
        where = f"{self.url} at {self.endpoint_url}"
        if isinstance(exc, bx.NoCredentialsError | bx.PartialCredentialsError):
            raise MirrorAccessDenied(
                "no S3 credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, or ~/.aws/credentials"
            ) from None
        if isinstance(exc, bx.NoRegionError):  # pragma: no cover - we always set one
            raise MirrorError("no AWS region configured: set AWS_REGION") from None
        if isinstance(exc, bx.ClientError):
            err = exc.response.get("Error", {})
            code = str(err.get("Code", "") or "")
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            message = _one_line(err.get("Message", "") or "")
            if code in ("NoSuchKey", "404") and op in ("get", "get_range", "head") and name:
                raise MirrorObjectMissing(f"object {name} does not exist in mirror {self.url}") from None
            if code == "NoSuchBucket" or (code == "404" and op == "check"):
                raise MirrorNotFound(f"S3 bucket {self.bucket!r} does not exist at {self.endpoint_url} (NoSuchBucket)") from None
            if code == "InvalidAccessKeyId":
                raise MirrorAccessDenied(
                    f"S3 at {self.endpoint_url} does not know the access key (InvalidAccessKeyId): check AWS_ACCESS_KEY_ID or your AWS profile"
                ) from None
            if code == "SignatureDoesNotMatch":
                raise MirrorAccessDenied(
                    f"S3 at {self.endpoint_url} refused the secret key (SignatureDoesNotMatch): check AWS_SECRET_ACCESS_KEY or your AWS profile"
                ) from None
            if code in _CREDENTIAL_CODES:
                raise MirrorAccessDenied(f"S3 at {self.endpoint_url} refused the credentials ({code}): {message}") from None
            if code in ("AccessDenied", "AllAccessDisabled", "403") or status == 403:
                raise MirrorAccessDenied(
                    f"S3 denied {what} on {where} ({code or 403}): wrong credentials or no permission on the bucket"
                ) from None
            if code == "BadDigest":
                raise MirrorUnreachable(f"S3 rejected {what} on {where}: the upload was corrupted in transit (BadDigest)") from None
            if code in _TRANSIENT_CODES or (status or 0) >= 500:
                raise MirrorUnreachable(f"S3 error on {what} at {where}: {code or status} {message}".rstrip()) from None
            raise MirrorError(f"S3 error on {what} at {where}: {code or status} {message}".rstrip()) from None
        if isinstance(exc, bx.EndpointConnectionError | bx.ConnectionError | bx.HTTPClientError):
            reason = _network_reason(exc, self.connect_timeout, self.read_timeout)
            cls = MirrorTimeout if _timed_out(exc) else MirrorUnreachable
            raise cls(f"cannot reach S3 endpoint {self.endpoint_url}: {reason}") from None
        if isinstance(exc, bx.ParamValidationError):
            raise MirrorError(f"invalid S3 request for {what} on {self.url}: {_one_line(str(exc), 160)}") from None
        if isinstance(exc, bx.BotoCoreError):
            raise MirrorError(f"S3 {what} on {where} failed: {_one_line(str(exc), 160)}") from None
        raise exc

    def _call(self, op: str, name: str | None, fn: Any, **kwargs: Any) -> Any:
        from botocore import exceptions as bx

        try:
            return fn(**kwargs)
        except (bx.BotoCoreError, bx.ClientError) as e:
            self._raise(e, op, name)

    # -- Mirror --------------------------------------------------------------

    def _body(self, data: bytes) -> Any:
        tick = self.on_progress
        return bytes(data) if tick is None else _Body(bytes(data), tick)

    def _put(self, name: str, data: bytes, *, if_none_match: bool) -> None:
        key = self._key(name)
        md5 = base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode()
        extra = {"IfNoneMatch": "*"} if if_none_match else {}
        self._call("put", name, self._client.put_object, Bucket=self.bucket, Key=key, Body=self._body(data), ContentMD5=md5, **extra)

    def put(self, name: str, data: bytes) -> None:
        self._put(name, data, if_none_match=False)

    def put_if_absent(self, name: str, data: bytes) -> bool:
        from botocore import exceptions as bx

        if self.conditional_writes is False:
            if self.exists(name):
                return False
            self._put(name, data, if_none_match=False)
            return True
        try:
            key = self._key(name)
            md5 = base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode()
            self._client.put_object(Bucket=self.bucket, Key=key, Body=self._body(data), ContentMD5=md5, IfNoneMatch="*")
        except bx.ClientError as e:
            code = str(e.response.get("Error", {}).get("Code", ""))
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code == "PreconditionFailed" or status == 412:
                return False
            if self.conditional_writes is None and (code in _NOT_IMPLEMENTED_CODES or status == 501):
                log.warning("S3 at %s does not support conditional writes (If-None-Match); using HEAD then PUT", self.endpoint_url)
                self.conditional_writes = False
                return self.put_if_absent(name, data)
            self._raise(e, "put", name)
        except bx.BotoCoreError as e:
            self._raise(e, "put", name)
        return True

    def get(self, name: str) -> bytes:
        resp = self._call("get", name, self._client.get_object, Bucket=self.bucket, Key=self._key(name))
        return self._read_body(resp, name)

    def _read_body(self, resp: dict[str, Any], name: str) -> bytes:
        from botocore import exceptions as bx

        body = resp["Body"]
        try:
            return body.read()
        except (bx.BotoCoreError, OSError) as e:
            reason = _network_reason(e, self.connect_timeout, self.read_timeout)
            cls = MirrorTimeout if _timed_out(e) else MirrorUnreachable
            raise cls(f"reading {name} from {self.url} at {self.endpoint_url} failed: {reason}") from None
        finally:
            body.close()

    def get_range(self, name: str, offset: int, length: int) -> bytes:
        from botocore import exceptions as bx

        check_range(offset, length)
        key = self._key(name)
        if length == 0:
            if not self.exists(name):
                raise MirrorObjectMissing(f"object {name} does not exist in mirror {self.url}")
            return b""
        try:
            resp = self._client.get_object(Bucket=self.bucket, Key=key, Range=f"bytes={offset}-{offset + length - 1}")
        except bx.ClientError as e:
            code = str(e.response.get("Error", {}).get("Code", ""))
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code == "InvalidRange" or status == 416:
                return b""  # offset at or past the end (S3 checked the key exists)
            self._raise(e, "get_range", name)
        except bx.BotoCoreError as e:
            self._raise(e, "get_range", name)
        data = self._read_body(resp, name)
        # A server that ignores Range answers 200 with the whole object.
        if resp.get("ResponseMetadata", {}).get("HTTPStatusCode") == 200 and "ContentRange" not in resp:
            data = data[offset : offset + length]
        return data

    def exists(self, name: str) -> bool:
        from botocore import exceptions as bx

        try:
            self._client.head_object(Bucket=self.bucket, Key=self._key(name))
        except bx.ClientError as e:
            code = str(e.response.get("Error", {}).get("Code", ""))
            if code in ("404", "NoSuchKey", "NotFound"):
                return False
            self._raise(e, "head", name)
        except bx.BotoCoreError as e:
            self._raise(e, "head", name)
        return True

    def list(self, prefix: str = "") -> Iterator[tuple[str, int]]:
        validate_prefix(prefix)
        full = self._key_base + prefix
        strip = len(self._key_base)
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": full, "MaxKeys": self.list_page_size}
            if token:
                kwargs["ContinuationToken"] = token
            resp = self._call("list", prefix or None, self._client.list_objects_v2, **kwargs)
            for obj in resp.get("Contents", ()):
                key = obj["Key"]
                if key.endswith("/"):  # "directory marker" objects some tools create
                    continue
                yield key[strip:], int(obj.get("Size", 0))
            token = resp.get("NextContinuationToken")
            if not resp.get("IsTruncated") or not token:
                return

    def delete(self, name: str) -> None:
        self._call("delete", name, self._client.delete_object, Bucket=self.bucket, Key=self._key(name))

    def check(self) -> None:
        # ListObjectsV2 (not HeadBucket): its error bodies carry the precise
        # code (InvalidAccessKeyId, SignatureDoesNotMatch, NoSuchBucket),
        # and the replicator needs list permission anyway.
        self._call("check", None, self._client.list_objects_v2, Bucket=self.bucket, Prefix=self._key_base, MaxKeys=1)

    def close(self) -> None:
        close = getattr(self._client, "close", None)
        if close is not None:
            close()
