"""Command line: one ``cmd_<name>(args) -> int`` per command; parse, call, print.

Only ``main`` catches DeltafsError and prints its one line on stderr.
"""

from __future__ import annotations

import argparse
import os
import sys

from deltafs import __version__
from deltafs.errors import EXIT_INTERRUPTED, DeltafsError

DESCRIPTION = """\
deltafs mounts a directory (SRC) at a mount point (MNT) and passes every
operation through to SRC. On every close and fsync it records what changed
as deduplicated, compressed, content-defined chunks in a journal (by
default SRC/.deltafs), so any version of any file, or the whole tree at any
moment, can be brought back.
"""

EPILOG = """\
exit status: 0 ok, 1 partial, 2 bad input, 3 journal problem, 4 mount
problem, 5 mirror problem, 6 daemon not answering, 130 interrupted.
See docs/cli.md for every command and its JSON output.
"""


def cmd_mount(args: argparse.Namespace) -> int:
    from deltafs import mount
    from deltafs.config import MountConfig

    if args.ready_fd is None:  # the daemon re-checks; the user gets errors before any fork
        mount.check_fuse()
    src, mnt, journal = mount.check_mount_args(args.src, args.mnt, args.journal)
    cfg = MountConfig(src=src, mnt=mnt, journal=journal, foreground=args.foreground,
                      fuse_options=tuple(args.option), debug=args.debug,
                      capture=not args.no_capture, log_level=args.log_level,
                      log_file=args.log_file)
    if not args.foreground:
        argv = ["mount", src, mnt, "--journal", journal, "--log-level", args.log_level]
        for o in args.option:
            argv += ["-o", o]
        if args.no_capture:
            argv.append("--no-capture")
        if args.debug:
            argv.append("--debug")
        mount.spawn_daemon(cfg, argv)
        return 0
    return mount.run_daemon(cfg, args.ready_fd)


def cmd_umount(args: argparse.Namespace) -> int:
    from deltafs import mount

    mount.unmount(args.mnt, timeout=args.timeout)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="deltafs", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"deltafs {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    m = sub.add_parser(
        "mount", help="mount SRC at MNT and record every save",
        description="Mount SRC at MNT. Every operation passes through to SRC; every close and "
                    "fsync of a changed file is recorded in the journal. Without --foreground the "
                    "command returns once MNT is usable and the daemon runs detached, logging to "
                    "JOURNAL/deltafs.log. Unmount with 'deltafs umount MNT'.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    m.add_argument("src", metavar="SRC", help="the directory whose history is kept")
    m.add_argument("mnt", metavar="MNT", help="an empty directory to mount it on")
    m.add_argument("-f", "--foreground", action="store_true",
                   help="stay attached, log to stderr; Ctrl-C unmounts cleanly")
    m.add_argument("--journal", metavar="DIR", help="where the journal lives (default SRC/.deltafs)")
    m.add_argument("-o", dest="option", metavar="OPTION", action="append", default=[],
                   help="a FUSE mount option, e.g. allow_other (repeatable, comma lists allowed)")
    m.add_argument("--no-capture", action="store_true",
                   help="pass-through only: record nothing (for benchmarks and debugging)")
    m.add_argument("--debug", action="store_true", help="log every FUSE request (slow)")
    m.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                   help="log level of the daemon (default INFO)")
    m.add_argument("--log-file", help=argparse.SUPPRESS)
    m.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    m.set_defaults(func=cmd_mount)

    u = sub.add_parser(
        "umount", aliases=["unmount"], help="unmount MNT, waiting until every capture is written",
        description="Unmount a deltafs mount and wait until its daemon has written every pending "
                    "capture and exited. Works for the user who mounted it.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    u.add_argument("mnt", metavar="MNT")
    u.add_argument("--timeout", type=float, default=300.0, metavar="SECONDS",
                   help="how long to wait for the daemon to finish (default 300)")
    u.set_defaults(func=cmd_umount)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except DeltafsError as e:
        print(f"deltafs: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("deltafs: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
