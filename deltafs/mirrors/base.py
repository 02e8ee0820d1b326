"""The Mirror interface: a flat store of immutable-ish named objects.

A mirror is the storage layer under replication.  It knows nothing about
segments, packs or manifests; it stores bytes under '/'-separated relative
names (``segments/0000000000000001-0000000000000100.seg``,
``packs/<hex>.pack``, ``manifest.json``).

Every method blocks: the replicator calls them from worker threads through
``trio.to_thread.run_sync`` (one limiter per mirror).  Implementations must
be safe to call from several threads at once.

Every failure a user can cause (unreachable endpoint, wrong credentials,
missing bucket or directory, full disk, no permission) is raised as a
:class:`~deltafs.errors.MirrorError` subclass whose ``str()`` is one line.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator

from deltafs.errors import EXIT_USAGE, MirrorError, UsageError

# A temp object written by the file backend before its final rename.  No
# valid object name may contain a part starting with this, so a temp file
# can never be mistaken for (or collide with) a real object.
TEMP_PREFIX = ".deltafs-tmp-"

MAX_NAME_BYTES = 1024  # S3's key limit; the mirror prefix counts too
MAX_PART_BYTES = 255  # NAME_MAX of every common filesystem


class MirrorObjectMissing(MirrorError):
    """The named object does not exist in the mirror."""


class MirrorUnreachable(MirrorError):
    """The mirror could not be reached (network, timeout, server down).

    Transient: the replicator should back off and retry.
    """


class MirrorTimeout(MirrorUnreachable):
    """The mirror accepted the request but did not answer in time (a hung
    server).  The replicator shows the mirror as ``stalled``."""


class MirrorAccessDenied(MirrorError):
    """Credentials refused or permission missing.  Retrying will not help."""


class MirrorNotFound(MirrorError):
    """The bucket or mirror directory does not exist."""


class MirrorURLError(MirrorError, UsageError):
    """A mirror URL that cannot be parsed or has an unknown scheme.

    Both a MirrorError and a UsageError; exits with the usage code (2).
    """

    exit_code = EXIT_USAGE


class MirrorNameError(MirrorError, ValueError):
    """An object name that is not a clean relative '/'-separated name."""


def validate_name(name: str) -> str:
    """Return ``name`` if it is a valid object name, else raise MirrorNameError.

    Valid: a non-empty str of '/'-separated parts, no leading or trailing
    '/', no empty part, no '.' or '..' part, no NUL/control characters, no
    part starting with the temp prefix, at most 255 bytes per part and
    1024 bytes in all (UTF-8).
    """
    if not isinstance(name, str):
        raise MirrorNameError(f"object name must be a str, not {type(name).__name__}")
    if not name:
        raise MirrorNameError("empty object name")
    if name.startswith("/"):
        raise MirrorNameError(f"object name {name!r} must be relative (no leading '/')")
    if any(ord(c) < 0x20 or c == "\x7f" for c in name):
        raise MirrorNameError(f"object name {name!r} contains a control character")
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError:
        raise MirrorNameError(f"object name {name!r} is not valid UTF-8") from None
    if len(encoded) > MAX_NAME_BYTES:
        raise MirrorNameError(f"object name of {len(encoded)} bytes is too long (max {MAX_NAME_BYTES})")
    for part in name.split("/"):
        if not part:
            raise MirrorNameError(f"object name {name!r} has an empty part")
        if part in (".", ".."):
            raise MirrorNameError(f"object name {name!r} contains a {part!r} part")
        if part.startswith(TEMP_PREFIX):
            raise MirrorNameError(f"object name {name!r} uses the reserved prefix {TEMP_PREFIX!r}")
        if len(part.encode("utf-8")) > MAX_PART_BYTES:
            raise MirrorNameError(f"object name {name!r} has a part longer than {MAX_PART_BYTES} bytes")
    return name


def validate_prefix(prefix: str) -> str:
    """Return ``prefix`` if it can start valid names ('' lists everything).

    A prefix is a plain string prefix, not a directory: ``"segments/"``,
    ``"segments/00000000000000"`` and ``"pack"`` are all fine.
    """
    if prefix == "":
        return prefix
    if not isinstance(prefix, str):
        raise MirrorNameError(f"prefix must be a str, not {type(prefix).__name__}")
    # Every complete part must be valid; the last (possibly partial or
    # empty, after a trailing '/') part may be any start of a valid part.
    head, _, last = prefix.rpartition("/")
    if head:
        validate_name(head)
    elif prefix.startswith("/"):
        raise MirrorNameError(f"prefix {prefix!r} must be relative (no leading '/')")
    if last:
        if any(ord(c) < 0x20 or c == "\x7f" for c in last):
            raise MirrorNameError(f"prefix {prefix!r} contains a control character")
        if last == "..":
            raise MirrorNameError(f"prefix {prefix!r} contains a '..' part")
    return prefix


def check_range(offset: int, length: int) -> None:
    if offset < 0 or length < 0:
        raise ValueError(f"negative offset or length: offset={offset} length={length}")


class Mirror(abc.ABC):
    """A durable store of named objects (see the module docstring)."""

    #: Objects per listing request (S3 ``MaxKeys``); tests lower it to
    #: exercise pagination.  Backends that list in one go ignore it.
    list_page_size: int = 1000

    @property
    @abc.abstractmethod
    def url(self) -> str:
        """The mirror's URL for messages and status: never holds a secret."""

    @abc.abstractmethod
    def put(self, name: str, data: bytes) -> None:
        """Store ``data`` under ``name``, replacing any object there.

        Atomic: a reader sees the old object, or the whole new one, never a
        partial object under ``name``.  Durable when it returns.
        """

    @abc.abstractmethod
    def put_if_absent(self, name: str, data: bytes) -> bool:
        """Create ``name`` only if it does not exist; return whether we did.

        Uses the backend's conditional create where it has one (hard link
        or rename-noreplace for files, ``If-None-Match: *`` for S3); each
        backend documents its fallback when the storage has none.
        """

    @abc.abstractmethod
    def get(self, name: str) -> bytes:
        """The object's whole content; MirrorObjectMissing if absent."""

    @abc.abstractmethod
    def get_range(self, name: str, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes from ``offset``, like ``os.pread``.

        Shorter at the end of the object; ``b""`` at or beyond it.
        MirrorObjectMissing if the object does not exist.
        """

    @abc.abstractmethod
    def exists(self, name: str) -> bool:
        """Whether an object named ``name`` exists."""

    @abc.abstractmethod
    def list(self, prefix: str = "") -> Iterator[tuple[str, int]]:
        """``(name, size)`` of every object whose name starts with ``prefix``.

        Sorted by name (byte order of the UTF-8 names, as S3 does).
        Never yields temp objects.  Paginated where the backend needs it.
        """

    @abc.abstractmethod
    def delete(self, name: str) -> None:
        """Remove ``name``.  Deleting a missing object is not an error."""

    @abc.abstractmethod
    def check(self) -> None:
        """Verify the mirror is reachable and usable, or raise MirrorError.

        The message says precisely what is wrong (endpoint down, credentials
        refused, bucket or directory missing, not writable).
        """

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections.  The mirror must not be used afterwards."""

    def __enter__(self) -> Mirror:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.url}>"
