"""The DeltafsError tree and the one exit-code table.

Library code raises a subclass carrying its exit code; only ``cli.main``
catches it and prints one line on stderr.  docs/cli.md lists the codes.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_PARTIAL = 1  # e.g. a mirror behind, some files not restored
EXIT_USAGE = 2  # bad input: missing paths, unknown versions, bad WHEN
EXIT_JOURNAL = 3  # journal locked, of another format, corrupted
EXIT_MOUNT = 4  # FUSE missing, mount or unmount failed
EXIT_MIRROR = 5  # mirror unreachable, refused, inconsistent
EXIT_DAEMON = 6  # the daemon of a mount did not answer
EXIT_INTERRUPTED = 130

# What each exit status means, in the words of `deltafs --help` (its epilog is
# made from this table; docs/cli.md "Exit status" says the same at length).
CODE_MEANINGS = {
    EXIT_OK: "ok",
    EXIT_PARTIAL: "partial",
    EXIT_USAGE: "bad input",
    EXIT_JOURNAL: "journal problem",
    EXIT_MOUNT: "mount problem",
    EXIT_MIRROR: "mirror problem",
    EXIT_DAEMON: "daemon not answering",
    EXIT_INTERRUPTED: "interrupted",
}


class DeltafsError(Exception):
    """An error a user can act on.  str(err) is the one line printed."""

    exit_code = EXIT_USAGE


class UsageError(DeltafsError):
    """Bad input: a path that does not exist, a WHEN that cannot be parsed..."""

    exit_code = EXIT_USAGE


class NotFoundError(UsageError):
    """A path, version or snapshot the journal has never seen."""


class NotMountedError(UsageError):
    """A command that needs a running mount (flush, pause, resume) found none.

    Commands that can do without the daemon catch it (flush: nothing is
    pending without one)."""

    exit_code = EXIT_USAGE


class JournalError(DeltafsError):
    exit_code = EXIT_JOURNAL


class JournalFormatError(JournalError):
    """A journal of a format version this deltafs cannot read."""


class JournalLockedError(JournalError):
    """Another mount holds the journal's write lock."""


class CorruptionError(JournalError):
    """A chunk whose bytes do not match its hash, a chunk list that does not
    match its version, or a broken hash chain.

    ``path`` and ``version`` (when known) name the file version whose read
    found it; the message then starts with them.  ``detail`` is the message
    without that prefix (for callers that name the file their own way)."""

    def __init__(self, message: str, path: bytes | None = None, version: int | None = None) -> None:
        self.detail = message
        self.path = path
        self.version = version
        if version is not None:
            from deltafs.names import show_name

            where = f"{show_name(path)} (version {version})" if path is not None else f"version {version}"
            message = f"{where}: {message}"
        super().__init__(message)


class MountError(DeltafsError):
    exit_code = EXIT_MOUNT


class FuseUnavailableError(MountError):
    """No /dev/fuse or no fusermount3."""


class MirrorError(DeltafsError):
    exit_code = EXIT_MIRROR


class DaemonError(DeltafsError):
    exit_code = EXIT_DAEMON


class PartialError(DeltafsError):
    """The work was done except for the parts named in the message."""

    exit_code = EXIT_PARTIAL
