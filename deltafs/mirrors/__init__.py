"""Mirrors: durable copies of the journal in a directory or an S3 bucket.

``open_mirror(url)`` is the one entry point; see docs/mirrors.md.
"""

from __future__ import annotations

import os
import re
from urllib.parse import unquote, urlsplit

from deltafs.errors import MirrorError

from .base import (
    Mirror,
    MirrorAccessDenied,
    MirrorNameError,
    MirrorNotFound,
    MirrorObjectMissing,
    MirrorTimeout,
    MirrorUnreachable,
    MirrorURLError,
    validate_name,
)

__all__ = [
    "Mirror",
    "MirrorAccessDenied",
    "MirrorError",
    "MirrorNameError",
    "MirrorNotFound",
    "MirrorObjectMissing",
    "MirrorTimeout",
    "MirrorURLError",
    "MirrorUnreachable",
    "open_mirror",
    "validate_name",
]

SCHEMES = ("file", "s3")
_BUCKET_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{1,254}$")


def open_mirror(url: str, *, endpoint_url: str | None = None) -> Mirror:
    """Open the mirror at ``url``.

    * ``file:///abs/path`` -- a directory; it is created if missing, but its
      parent must exist.  ``file://localhost/abs/path`` is accepted too.
    * ``s3://bucket`` or ``s3://bucket/prefix`` -- credentials, region and
      (unless ``endpoint_url`` is given) endpoint from the standard AWS
      environment and config files.

    Opening does not contact the network; call ``check()`` for that.
    Raises MirrorURLError (a MirrorError and a UsageError, exit code 2) for
    a URL that cannot be parsed or has an unknown scheme, and MirrorError for
    one that cannot be opened.
    """
    if not isinstance(url, str) or not url.strip():
        raise MirrorURLError("empty mirror URL (expected file:///path or s3://bucket/prefix)")
    url = url.strip()
    if "://" not in url:
        raise MirrorURLError(f"mirror URL {_show(url)} has no scheme (expected file:///path or s3://bucket/prefix)")
    try:
        parts = urlsplit(url)
    except ValueError as e:
        raise MirrorURLError(f"malformed mirror URL {_show(url)}: {e}") from None
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise MirrorURLError(f"unknown mirror URL scheme {parts.scheme!r} in {_show(url)} (supported: file://, s3://)")
    if parts.query or parts.fragment:
        raise MirrorURLError(f"mirror URL {_show(url)} must not have a query or fragment")
    if scheme == "file":
        return _open_file(url, parts)
    return _open_s3(url, parts, endpoint_url)


def _show(url: str) -> str:
    """The URL for an error message, with any user:password removed."""
    from .s3 import redact_url

    return redact_url(url)


def _open_file(url: str, parts) -> Mirror:
    from .file import FileMirror

    if parts.netloc not in ("", "localhost"):
        raise MirrorURLError(
            f"file mirror URL {_show(url)} names host {parts.netloc!r}; use file:///absolute/path (three slashes)"
        )
    path = unquote(parts.path)
    if not path.startswith("/"):
        raise MirrorURLError(f"file mirror URL {_show(url)} needs an absolute path: file:///absolute/path")
    if "\x00" in path:
        raise MirrorURLError("file mirror URL contains a NUL character")
    return FileMirror(os.path.normpath(path))


def _open_s3(url: str, parts, endpoint_url: str | None) -> Mirror:
    from .s3 import S3Mirror

    if parts.username is not None or parts.password is not None:
        raise MirrorURLError(
            "credentials in an s3:// URL are not supported (they would leak into logs):"
            " use AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or ~/.aws/credentials"
        )
    bucket = parts.netloc
    if not bucket:
        raise MirrorURLError(f"s3 mirror URL {url!r} has no bucket: expected s3://bucket/prefix")
    if not _BUCKET_RE.match(bucket):
        raise MirrorURLError(f"invalid S3 bucket name {bucket!r} in {url!r}")
    prefix = unquote(parts.path).strip("/")
    if prefix:
        try:
            validate_name(prefix)
        except MirrorNameError as e:
            raise MirrorURLError(f"invalid prefix in s3 mirror URL {url!r}: {e}") from None
    if endpoint_url is not None:
        ep = urlsplit(endpoint_url)
        if ep.scheme not in ("http", "https") or not ep.hostname:
            raise MirrorURLError(f"invalid S3 endpoint URL {_show(endpoint_url)} (expected http(s)://host[:port])")
    return S3Mirror(bucket, prefix, endpoint_url=endpoint_url)
