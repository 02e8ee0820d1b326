"""Command line: one ``cmd_<name>(args) -> int`` per command; parse, call, print.

Only ``main`` catches DeltafsError and prints its one line on stderr.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

from deltafs import __version__
from deltafs.errors import EXIT_INTERRUPTED, CODE_MEANINGS, DeltafsError

DESCRIPTION = """\
deltafs mounts a directory (SRC) at a mount point (MNT) and passes every
operation through to SRC. On every close and fsync it records what changed
as deduplicated, compressed, content-defined chunks in a journal (by
default SRC/.deltafs), so any version of any file, or the whole tree at any
moment, can be brought back.
"""

def exit_status_epilog() -> str:
    """The --help epilog: the exit-code table of deltafs/errors.py, wrapped."""
    import textwrap

    codes = ", ".join(f"{code} {text}" for code, text in CODE_MEANINGS.items())
    return (textwrap.fill(f"exit status: {codes}.", 79)
            + "\nSee docs/cli.md for every command and its JSON output.\n")


EPILOG = exit_status_epilog()


def cmd_mount(args: argparse.Namespace) -> int:
    import dataclasses

    from deltafs import mount
    from deltafs.config import MountConfig

    if args.at is not None or args.mnt is None:  # a read-only view of the past (pastfs)
        return mount.mount_at(args, MountConfig.from_args(args, args.src, args.mnt, args.journal))
    # every option parsed first: bad ones give one line and exit 2 before any fork
    cfg = MountConfig.from_args(args, args.src, args.mnt, args.journal, log_file=args.log_file)
    if args.ready_fd is None:  # the daemon re-checks; the user gets errors before any fork
        mount.check_fuse()
        if cfg.metrics_addr is not None:
            from deltafs.metrics import check_addr

            check_addr(*cfg.metrics_addr)  # unresolvable HOST: exit 2; port in use: exit 4
    src, mnt, journal = mount.check_mount_args(args.src, args.mnt, args.journal)
    cfg = dataclasses.replace(cfg, src=src, mnt=mnt, journal=journal)
    if cfg.mirrors:
        from deltafs.mirrors import open_mirror

        for url in cfg.mirrors:  # bad URLs fail here, before any fork (no network yet)
            open_mirror(url, endpoint_url=cfg.endpoint_url).close()
    if cfg.group:  # join (and one pass) before the daemon starts (docs/sync.md)
        _join_for_mount(args, cfg)
    if args.encrypt and (cfg.mirrors or not cfg.group):  # keys into the journal before the daemon starts
        _unlock_mount_mirrors(args, cfg)
    elif args.passphrase_file or args.key_file:
        from deltafs.errors import UsageError
        raise UsageError("--passphrase-file and --key-file go with --encrypt")
    if not cfg.foreground:
        mount.spawn_daemon(cfg)
        return 0
    return mount.run_daemon(cfg, args.ready_fd)


def _join_for_mount(args: argparse.Namespace, cfg) -> None:
    """mount --group URL: make the journal a member of that group (a no-op if it is one)."""
    from deltafs import sync
    from deltafs.errors import UsageError
    from deltafs.journal import Journal
    from deltafs.mirrors import open_mirror

    with open_mirror(cfg.group, endpoint_url=cfg.endpoint_url) as backend:
        url = backend.url
    old = sync.membership(cfg.journal) if os.path.isdir(cfg.journal) else None
    if old is not None:
        if old.url != url:
            raise UsageError(f"{cfg.src} is a member of the group at {old.url}, not {url}: "
                             "`deltafs group leave` first")
        return
    with Journal.open(cfg.journal, create=True) as j:
        st = sync.join(j, cfg.group, endpoint_url=cfg.endpoint_url, secrets=_secrets(args), encrypt=args.encrypt)
        sync.run_pass(j, cfg.src)
    print(f"joined group {st.url} as device {st.device}", file=sys.stderr)


def _unlock_mount_mirrors(args: argparse.Namespace, cfg) -> None:
    """mount --mirror URL --encrypt: create or unlock each mirror, keep its key in the journal."""
    from deltafs.errors import UsageError
    from deltafs.mirrors import keys, open_mirror

    if not cfg.mirrors:
        raise UsageError("--encrypt needs --mirror URL")
    store = keys.KeyStore(cfg.journal)
    for url in cfg.mirrors:
        with open_mirror(url, endpoint_url=cfg.endpoint_url) as backend:
            backend.check()
            key = keys.add_or_unlock(backend, _secrets(args), encrypt=True, stored=store.load(backend.url))
            store.save(backend.url, key)


def cmd_umount(args: argparse.Namespace) -> int:
    from deltafs import mount

    mount.unmount(args.mnt, timeout=args.timeout)
    return 0


def _history_open(args: argparse.Namespace):
    """-> (Location, read-only Journal) for the PATH of log/cat/diff/restore."""
    from deltafs.journal import Journal
    from deltafs.locate import locate

    loc = locate(args.path, args.journal)
    j = Journal.open(loc.journal, readonly=True)
    return loc, j


def _print_json(d) -> None:
    import json

    line = json.dumps(d, ensure_ascii=False)
    try:
        line.encode()
    except UnicodeEncodeError:  # a name that is not UTF-8: its bytes as \udcXX escapes
        line = json.dumps(d)
    print(line, flush=True)


def cmd_log(args: argparse.Namespace) -> int:
    from deltafs import history

    loc, j = _history_open(args)
    table = sys.stdout.isatty() and not args.json
    emit = _print_json if args.json else (lambda d: print(history.log_line(d, table), flush=True))
    with j:
        with j.reader() as r:
            head = r.head_seq()
            if args.deleted:
                rows = history.deleted_entries(r, loc.rel, args.since, args.until, args.limit)
            elif args.records:
                rows = list(history.log_entries(r, loc.rel, args.since, args.until, args.limit,
                                                show_pruned=args.all, follow=args.follow))
            else:  # saves: each groups its records (docs/cli.md "deltafs log")
                recs = history.log_entries(r, loc.rel, args.since, args.until,
                                           show_pruned=args.all, follow=args.follow)
                rows = list(itertools.islice(history.save_entries(recs), args.limit))
        if args.watch and not args.deleted:
            rows.reverse()  # following: oldest first, new records appended below
        if table and rows:
            print(history.LOG_HEADER)
        for d in rows:
            emit(d)
        if not args.watch:
            return 0
        try:
            for batch in history.follow_batches(j, loc.rel, head):
                for d in (batch if args.records else history.group_saves(batch)):
                    emit(d)
        except KeyboardInterrupt:
            return 0  # Ctrl-C is how --watch ends


def _note_thinned(thinned, nearest: bool, verb: str = "given") -> None:
    """The one stderr line about files given at an earlier retained version."""
    from deltafs import history

    if thinned:
        _err(f"note: {history.thinned_note(thinned, nearest, verb)}")


def _err(line: str) -> None:
    from deltafs.names import one_line

    print(f"deltafs: {one_line(line)}", file=sys.stderr, flush=True)


def cmd_cat(args: argparse.Namespace) -> int:
    from deltafs import history

    loc, j = _history_open(args)
    out = sys.stdout.buffer
    thinned: list = []
    with j, j.reader() as r:
        _, chunks = history.cat_source(r, loc.rel, args.at, args.version, thinned=thinned)
        for data in chunks:  # each chunk is verified before it is yielded
            out.write(data)
    out.flush()
    _note_thinned(thinned, args.nearest)
    return history.outcome_code(thinned=bool(thinned), nearest=args.nearest)


def cmd_diff(args: argparse.Namespace) -> int:
    from deltafs import history
    from deltafs.journal import KIND_DIR

    loc, j = _history_open(args)
    with j, j.reader() as r:
        fid = r.file_id_at(loc.rel) if loc.rel else None
        st = r.file_state(fid) if fid is not None else None
        is_dir = loc.rel == b"" or (st is not None and st.kind == KIND_DIR)
        if not is_dir and st is None:  # gone now: look at what it was at TO
            p = history.resolve_point(r, args.to) if args.to else None
            e = history.entry_at(r, loc.rel, p.seq) if p else None
            is_dir = e is not None and e.kind == KIND_DIR
        if is_dir:
            for d in history.diff_tree(r, loc.rel, args.frm, args.to):
                _print_json(d) if args.json else print(history.diff_tree_line(d, args.stat))
            return 0
        d = history.diff_file(r, loc.rel, args.frm, args.to, stat_only=args.stat)
    if args.json:
        _print_json(d)
    else:
        sys.stdout.write(history.diff_file_text(d, args.stat))
    thinned = [history.Thinned(loc.rel, t["asked"], t["given"], t["side"]) for t in d.get("thinned", [])]
    _note_thinned(thinned, args.nearest, "compared")
    return history.outcome_code(thinned=bool(thinned), nearest=args.nearest)


def cmd_restore(args: argparse.Namespace) -> int:
    from deltafs import history
    from deltafs.locate import locate

    loc = locate(args.path, args.journal)
    progress = history.ProgressLine(sys.stderr) if sys.stderr.isatty() and not args.dry_run else None
    if loc.mnt is not None and not args.dry_run:
        _guard_allow_me(loc)  # an in-place restore through a blocking mount is the user's repair
    try:
        rep = history.restore(loc.journal, loc.rel, at=args.at, version=args.version, dest=args.to,
                              mnt=loc.mnt, src=loc.src, force=args.force, dry_run=args.dry_run,
                              progress=progress)
    finally:
        if progress:
            progress.close()
    _report_restore(rep, args.nearest, args.dry_run)
    if args.json:
        _print_json(rep.to_dict())
    else:
        if args.dry_run:
            from deltafs.names import quote_name

            for a in rep.plan:
                print(f"{a['action']}\t{quote_name(a['path'])}\t{quote_name(a['target'])}")
        print(rep.summary())
    return history.restore_exit_code(rep, args.nearest)


def cmd_rollback(args: argparse.Namespace) -> int:
    """docs/cli.md "deltafs rollback"; the work is history.rollback (docs/guard.md)."""
    from deltafs import history
    from deltafs.locate import locate

    loc = locate(args.path, args.journal)
    snap = None
    if not args.dry_run:
        snap = _snapshot_before(loc, history.snapshot_name(history.ROLLBACK_PREFIX))
    rep = history.rollback(loc.journal, loc.rel, at=args.to, mnt=loc.mnt, src=loc.src, dry_run=args.dry_run)
    _report_restore(rep, False, args.dry_run)
    if args.json:
        _print_json({**rep.to_dict(), "undo_snapshot": snap})
    else:
        if args.dry_run:
            from deltafs.names import quote_name

            for a in rep.plan:
                print(f"{a['action']}\t{quote_name(a['path'])}")
        print(rep.summary().replace("would restore ", "would roll back ", 1).replace("restored ", "rolled back ", 1))
        if snap:
            print(f"undo with: deltafs rollback {quote_arg(args.path or '.')} --to {snap}")
    return history.restore_exit_code(rep, True)


def _guard_allow_me(loc) -> None:
    """Under --guard-action block a standing alert refuses changes through the
    mount: the rollback that undoes the attack is let through (docs/guard.md)."""
    from deltafs import control
    from deltafs.errors import DeltafsError

    try:
        control.request(loc.journal, "guard", action="allow", pid=os.getpid())
    except DeltafsError:
        pass  # the guard is off: nothing blocks


def _snapshot_before(loc, name: str) -> str:
    """Name the head before a rollback changes anything (through the daemon when mounted)."""
    from deltafs import control, snapshots
    from deltafs.journal import Journal

    if loc.mnt is not None:
        control.request(loc.journal, "flush")
        control.request(loc.journal, "snapshot", name=name)
        _guard_allow_me(loc)
    else:
        j = Journal.open(loc.journal)
        try:
            snapshots.make(j, name)
        finally:
            j.close()
    return name


def quote_arg(s: str) -> str:
    import shlex

    return shlex.quote(s)


def _report_restore(rep, nearest: bool, dry_run: bool = False) -> None:
    """Warnings, then one line per path not restored, then the thinned note (stderr)."""
    for w in rep.warnings:
        _err(f"warning: {w}")
    for e in rep.errors:
        _err(f"error: {e}")
    _note_thinned(rep.thinned, nearest, "would be restored" if dry_run else "restored")


# ---- status and the control socket (docs/cli.md "deltafs status" ... "Control socket")

def _control_target(args: argparse.Namespace):
    from deltafs.locate import locate

    return locate(getattr(args, "path", None), args.journal)


def cmd_status(args: argparse.Namespace) -> int:
    import time

    from deltafs import status

    def gather() -> list[dict]:
        if args.path is None and args.journal is None:
            return status.all_mounts(args.timeout)
        return [status.status_of(_control_target(args), args.timeout)]

    while True:
        sts = gather()
        if args.check:
            probs = [p for st in sts for p in status.problems(st, args.max_lag, args.max_peer_age)]
            for p in probs:
                print(f"CRITICAL: {p}", flush=True)
            if not probs:
                print(f"OK: {len(sts)} deltafs mount(s) or journal(s) healthy", flush=True)
            rc = 1 if probs else 0
        elif args.prometheus:
            sys.stdout.write(status.prometheus(sts).decode())
            rc = 0
        elif args.json:
            for st in sts:
                _print_json(st)
            rc = 0
        else:
            if args.watch and sys.stdout.isatty():
                sys.stdout.write("\033[H\033[2J")
            print("\n".join(status.format_text(st) for st in sts) if sts else "no deltafs mounts",
                  flush=True)
            rc = 0
        if not args.watch:
            return rc
        try:
            time.sleep(args.interval)
        except KeyboardInterrupt:
            return 0  # Ctrl-C is how --watch ends


def _daemon_request(args: argparse.Namespace, op: str, **fields) -> dict:
    """Ask the mount's daemon; NotMountedError when PATH is not mounted."""
    from deltafs import control
    from deltafs.errors import NotMountedError

    loc = _control_target(args)
    if loc.mount is None:
        raise NotMountedError(f"{loc.src or loc.journal} is not mounted")
    return control.request(loc.journal, op, timeout=args.timeout, **fields)


def _ask_daemon(journal: str, mount, op: str, timeout: float | None, **fields) -> dict | None:
    """The daemon's answer when the journal is mounted (``mount``: its mount-table
    entry) and its daemon listens, else None: the caller then opens the journal
    itself (a dead daemon's journal lock tells whether it still lives)."""
    from deltafs import control

    if mount is None:
        return None
    try:
        return control.request(journal, op, timeout=timeout, **fields)
    except control.DaemonNotRunning:
        return None


def cmd_flush(args: argparse.Namespace) -> int:
    from deltafs.errors import NotMountedError

    try:
        out = _daemon_request(args, "flush", **({"mirrors": True} if args.mirrors else {}))
    except NotMountedError:
        out = {"seconds": 0.0, "mounted": False}  # nothing is pending without a daemon
        if args.mirrors:
            _check_mirrors_offline(_control_target(args))
    if args.json:
        _print_json(out)
    return 0


def _check_mirrors_offline(loc) -> None:
    """flush --mirrors without a mount: nothing ships; fail if a registered mirror lacks records."""
    from deltafs import status
    from deltafs.errors import MirrorError
    from deltafs.journal import Journal

    with Journal.open(loc.journal, readonly=True) as j, j.reader() as r:
        behind = [mi for mi in status.stored_mirrors(r) if mi["registered"] and mi["lag_records"]]
    if behind:
        mi = behind[0]
        raise MirrorError(f"{loc.src or loc.journal} is not mounted, and mirror {mi['url']} lacks "
                          f"{mi['lag_records']} records: ship them with deltafs mirror sync {mi['url']}"
                          + (f" (and {len(behind) - 1} more mirror(s))" if len(behind) > 1 else ""))


def cmd_pause(args: argparse.Namespace) -> int:
    if args.group:
        return _pause_group(args)
    out = _daemon_request(args, args.command, **({"mirror": args.mirror} if args.mirror else {}))
    if args.json:
        _print_json(out)
    elif args.command == "resume" and out.get("rescan"):
        r = out["rescan"]
        print(f"resumed; recorded {r['new_or_changed']} new or changed file(s), {r['gone']} gone, "
              f"{r['dirs']} new dir(s) from the pause")
    return 0


def _pause_group(args: argparse.Namespace) -> int:
    """pause|resume --group: the sync group's passes stop or go on; capture goes on (docs/sync.md)."""
    from deltafs import sync
    from deltafs.errors import UsageError

    if args.mirror:
        raise UsageError("--group and --mirror: one at a time")
    loc = _control_target(args)
    pause = args.command == "pause"
    out = _ask_daemon(loc.journal, loc.mount, "group", args.timeout, action="pause" if pause else "resume")
    if out is None:  # not mounted: the state says it, the next mount or `group sync` obeys it
        out = sync.set_paused(loc.journal, pause)
    if args.json:
        _print_json(out)
    else:
        print(f"sync group {out['url']} " + ("paused (capture goes on)" if pause else "resumed"))
    return 0


def cmd_snapshot(args: argparse.Namespace) -> int:
    from deltafs import snapshots
    from deltafs.journal import Journal

    loc = _control_target(args)
    out = _ask_daemon(loc.journal, loc.mount, "snapshot", args.timeout, name=args.name)
    if out is not None:
        snap = out["snapshot"]
    else:
        snapshots.check_name(args.name)
        with Journal.open(loc.journal) as j:
            snap = snapshots.make(j, args.name)
    if args.json:
        _print_json(snap)
    else:
        print(f"snapshot {snap['name']!r} at version {snap['seq']}")
    return 0


def cmd_snapshots(args: argparse.Namespace) -> int:
    from datetime import datetime

    from deltafs import snapshots
    from deltafs.journal import Journal

    loc = _control_target(args)
    with Journal.open(loc.journal, readonly=True) as j, j.reader() as r:
        snaps = snapshots.listing(r)
    for s in snaps:
        if args.json:
            _print_json(s)
        else:
            t = datetime.fromtimestamp(s["time_ns"] / 1e9).isoformat(timespec="seconds") if s["time_ns"] else "-"
            print(f"{s['name']}\tv{s['seq']}\t{t}")
    return 0


def cmd_guard(args: argparse.Namespace) -> int:
    """docs/cli.md "deltafs guard"; docs/guard.md."""
    from deltafs import control

    loc = _control_target(args)
    if args.action == "test":
        from deltafs import guard
        from deltafs.journal import Journal
        from deltafs.when import resolve_when

        with Journal.open(loc.journal, readonly=True) as j, j.reader() as r:
            start = resolve_when(r, args.since).seq + 1 if args.since else 1
            end = resolve_when(r, args.until).seq if args.until else r.head_seq()
            out = guard.replay(r, start, end, args.level)
        if args.json:
            _print_json(out)
        else:
            for a in out["alerts"]:
                ex = ", ".join(e["path"] for e in a["examples"][:5])
                print(f"ALERT at version {a['examples'][-1]['version'] if a['examples'] else '?'}: {a['files']} files, "
                      f"score {a['score']} >= {a['threshold']}; the attack began after version "
                      f"{a['before_version']} (e.g. {ex})")
            print(f"{out['records']} records (versions {start}..{end}) at level {args.level}: "
                  f"{len(out['alerts'])} alert(s); score at the end {out['score']}")
        return 1 if out["alerts"] else 0
    if loc.mount is None and args.action == "resume":  # a sync group's held peers (docs/sync.md)
        from deltafs import sync

        released = sync.guard_resume(loc.journal)
        if released:
            if args.json:
                _print_json({"cleared": True, "sync_released": released})
            else:
                print(f"released sync peer(s) {', '.join(released)}: their events apply at the next pass")
            return 0
    if loc.mount is None:
        from deltafs.errors import UsageError

        raise UsageError(f"{args.path or '.'} is not mounted: the guard runs in a mount's daemon "
                         "(deltafs guard test works on the journal alone)")
    g = control.request(loc.journal, "guard", timeout=args.timeout,
                        action="resume" if args.action == "resume" else "status")["guard"]
    if args.json:
        _print_json(g)
    elif args.action == "resume":
        print("alert cleared; the guard watches again" if g.get("cleared") else "no alert stood; nothing to clear")
    else:
        a = g["alert"]
        print(f"guard {g['level']}: score {g['score']} of {g['threshold']:g} in a {g['window_s']:g}s window; "
              + ("ALERT" if a else "no alert"))
        if a:
            print(f"  {a['files']} files look destroyed; the attack began after version {a['before_version']}"
                  f" (snapshot {a['snapshot']}); {a['changes_since']} suspicious changes since")
            if a.get("blocking"):
                b = a["blocking"]
                who = ", ".join(f"{p['name']} (pid {p['pid']})" for p in b["processes"][:5])
                print(f"  changes through the mount are refused (--guard-action block): {b['refused']} so far"
                      + (f", by {who}" if who else ""))
            print(f"  undo: deltafs rollback {loc.mnt} --to {a['snapshot'] or 'v%d' % a['before_version']}"
                  f" ; then: deltafs guard resume {loc.mnt}")
    return 1 if args.action == "status" and g.get("alert") else 0


def _add_control_parsers(sub) -> None:
    fmt = argparse.HelpFormatter

    def common(q, path_help="a path inside MNT or SRC (default: the current directory)", timeout=None):
        q.add_argument("path", metavar="PATH", nargs="?", help=path_help)
        q.add_argument("--journal", metavar="DIR", help="use this journal directly")
        q.add_argument("--timeout", type=float, default=timeout, metavar="SECONDS",
                       help="how long to wait for the daemon" + (" (default: no limit)" if timeout is None
                                                                 else f" (default {timeout:g})"))

    st = sub.add_parser("status", help="show the state of mounts and journals",
                        description="Without PATH: every deltafs mount. With PATH: that mount (asked "
                                    "through its control socket) or, when not mounted, its journal "
                                    "alone.", epilog=EPILOG, formatter_class=fmt)
    common(st, "a path inside MNT or SRC (default: every mount)", 10.0)
    g = st.add_mutually_exclusive_group()
    g.add_argument("--json", action="store_true", help="JSON (JSON Lines for several mounts)")
    g.add_argument("--prometheus", action="store_true", help="Prometheus text exposition format")
    g.add_argument("--check", action="store_true",
                   help="exit 1 and say why when capture is failing or the journal is near a limit")
    st.add_argument("--max-lag", type=float, default=3600.0, metavar="SECONDS",
                    help="with --check: fail when a mirror lags more than this (default 3600)")
    st.add_argument("--max-peer-age", type=float, metavar="SECONDS",
                    help="with --check: fail when a sync group's peer was last heard longer ago (docs/sync.md)")
    st.add_argument("--watch", action="store_true", help="repeat every --interval seconds until Ctrl-C")
    st.add_argument("--interval", type=float, default=2.0, metavar="SECONDS", help=argparse.SUPPRESS)
    st.set_defaults(func=cmd_status)

    fl = sub.add_parser("flush", help="wait until every pending capture is durable",
                        description="Return once every capture queued so far (files closed or "
                                    "fsynced) is committed to the journal.", epilog=EPILOG,
                        formatter_class=fmt)
    common(fl)
    fl.add_argument("--mirrors", action="store_true",
                    help="then wait until every mirror holds it too (exit 5 if one cannot)")
    fl.add_argument("--json", action="store_true")
    fl.set_defaults(func=cmd_flush)

    for name, text in (("pause", "stop recording; the mount keeps working (see docs/cli.md)"),
                       ("resume", "record again, first what changed while paused")):
        p = sub.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".",
                           epilog=EPILOG, formatter_class=fmt)
        common(p)
        p.add_argument("--mirror", metavar="URL",
                       help=f"{name} uploads to this mirror of the mount instead (capture goes on)")
        p.add_argument("--group", action="store_true",
                       help=f"{name} the sync group's passes instead (capture goes on; docs/sync.md)")
        p.add_argument("--json", action="store_true")
        p.set_defaults(func=cmd_pause)

    sn = sub.add_parser("snapshot", help="name the current state",
                        description="Give the journal's current state a NAME, usable wherever a WHEN "
                                    "is. Through the daemon when mounted, else on the journal directly.",
                        epilog=EPILOG, formatter_class=fmt)
    sn.add_argument("name", metavar="NAME")
    common(sn)
    sn.add_argument("--json", action="store_true")
    sn.set_defaults(func=cmd_snapshot)

    gd = sub.add_parser("guard", help="the mass-damage guard: status, resume after an alert, test",
                        description="status: the guard's score and any standing alert (exit 1 while "
                                    "one stands). resume: clear the alert (compaction resumes). test: run "
                                    "the detector over records --since..--until of the journal and list "
                                    "what it would have flagged (exit 1 if anything). docs/guard.md.",
                        epilog=EPILOG, formatter_class=fmt)
    gd.add_argument("action", choices=("status", "resume", "test"))
    common(gd)
    gd.add_argument("--since", metavar="WHEN", help="test: from right after WHEN (default: the first record)")
    gd.add_argument("--until", metavar="WHEN", help="test: up to WHEN (default: now)")
    gd.add_argument("--level", choices=("low", "normal", "high"), default="normal",
                    help="test: the sensitivity to test (default normal)")
    gd.add_argument("--json", action="store_true")
    gd.set_defaults(func=cmd_guard)

    ss = sub.add_parser("snapshots", help="list named snapshots", epilog=EPILOG, formatter_class=fmt)
    common(ss)
    ss.add_argument("--json", action="store_true", help="JSON Lines")
    ss.set_defaults(func=cmd_snapshots)


def _add_nearest(q) -> None:
    q.add_argument("--nearest", action="store_true",
                   help="where retention pruned the version asked for, the latest retained version "
                        "before it is used and said so on stderr; with --nearest that is not a partial "
                        "result (exit 0 instead of 1)")


def _add_history_parsers(sub) -> None:
    fmt = argparse.HelpFormatter  # wrap the long descriptions
    when_help = ("WHEN: ISO 8601 (2026-11-23T09:00, local time unless a zone is given), relative "
                 "('10 minutes ago', 'yesterday 17:00', 'today 9:00', 'now'), a version id "
                 "(123, v123 or @123) or a snapshot name.")

    def common(q, path_help: str, optional: bool = False) -> None:
        q.add_argument("--journal", metavar="DIR",
                       help="use this journal directly (PATH is then relative to its tree)")
        q.add_argument("path", metavar="PATH", nargs="?" if optional else None, help=path_help)

    nearest = _add_nearest

    lg = sub.add_parser("log", help="list versions of a file, a directory or everything",
                        description="List the journal's versions of PATH (a file, everything under a "
                                    "directory, or the whole tree; default the current directory), "
                                    "newest first, one line per save (an editor's save groups its records; "
                                    "--records: one per record): version id, time, cause (or operation), "
                                    "size, bytes newly stored, path. Works with or without a "
                                    "running mount. " + when_help,
                        epilog=EPILOG, formatter_class=fmt)
    common(lg, "a path inside MNT or SRC (default: the current directory)", optional=True)
    lg.add_argument("--since", metavar="WHEN", help="only records at or after WHEN")
    lg.add_argument("--until", metavar="WHEN", help="only records at or before WHEN")
    lg.add_argument("-n", "--limit", type=int, metavar="N", help="at most N saves (records with --records)")
    lg.add_argument("--json", action="store_true",
                    help="JSON Lines, one object per save (its records in \"records\"; with "
                         "--records one object per record)")
    lg.add_argument("--records", action="store_true",
                    help="one line per journal record instead of one per save")
    lg.add_argument("--deleted", action="store_true", help="list deleted files and their last version")
    lg.add_argument("--all", action="store_true",
                    help="also list versions pruned by retention, marked (pruned); they cannot be restored")
    lg.add_argument("--follow", action="store_true",
                    help="a file's history across renames (like git log --follow); without it only "
                         "the records of PATH itself")
    lg.add_argument("-w", "--watch", action="store_true",
                    help="oldest first, then print new records as they are committed until Ctrl-C "
                         "(exit status 0)")
    lg.set_defaults(func=cmd_log)

    ct = sub.add_parser("cat", help="print a version of a file",
                        description="Write one version of a file to stdout (default: the latest). "
                                    + when_help, epilog=EPILOG, formatter_class=fmt)
    common(ct, "a file inside MNT or SRC (may be deleted since)")
    g = ct.add_mutually_exclusive_group()
    g.add_argument("--at", metavar="WHEN", help="the version current at WHEN")
    g.add_argument("--version", metavar="ID", help="this version id (see 'deltafs log')")
    nearest(ct)
    ct.set_defaults(func=cmd_cat)

    df = sub.add_parser("diff", help="show what changed in a file or a directory",
                        description="For a file: a unified diff between two versions (default: the "
                                    "previous and the current one); binary files get a size and chunk "
                                    "summary. For a directory: the paths added (A), removed (D) and "
                                    "changed (M) between FROM and TO (default: just before its latest "
                                    "change, and now). " + when_help,
                        epilog=EPILOG, formatter_class=fmt)
    common(df, "a file or directory inside MNT or SRC")
    df.add_argument("frm", metavar="FROM", nargs="?", help="WHEN of the old side")
    df.add_argument("to", metavar="TO", nargs="?", help="WHEN of the new side (default: now)")
    df.add_argument("--stat", action="store_true", help="only counts / a name-and-size list")
    df.add_argument("--json", action="store_true", help="JSON (a directory: JSON Lines)")
    nearest(df)
    df.set_defaults(func=cmd_diff)

    rs = sub.add_parser("restore", help="bring back a file, a directory or the whole tree",
                        description="Restore PATH as it was at WHEN (default: its latest version), "
                                    "deleted files included. Without --to it is restored in place: "
                                    "through the running mount (the restore becomes a new version; "
                                    "nothing newer is lost) or, when not mounted, into SRC with the "
                                    "restore journaled. Paths created after WHEN are left alone. "
                                    + when_help, epilog=EPILOG, formatter_class=fmt)
    common(rs, "a file, directory or the root, inside MNT or SRC (may be deleted since)")
    g = rs.add_mutually_exclusive_group()
    g.add_argument("--at", metavar="WHEN", help="the state at WHEN")
    g.add_argument("--version", metavar="ID", help="the state right after version ID")
    rs.add_argument("--to", metavar="DEST", help="write it to DEST instead of in place")
    rs.add_argument("--force", action="store_true",
                    help="overwrite an existing DEST (a directory is merged into)")
    rs.add_argument("-n", "--dry-run", action="store_true", help="say what would be restored, write nothing")
    rs.add_argument("--json", action="store_true", help="print a JSON summary")
    nearest(rs)
    rs.set_defaults(func=cmd_restore)

    rb = sub.add_parser("rollback", help="return a file, a directory or the whole tree to a moment",
                        description="Return PATH (default: the whole tree) to WHEN in place: files created "
                                    "since are removed, deleted ones come back, renamed ones go home. "
                                    "Through the running mount when mounted (journaled), else into SRC. "
                                    "A snapshot rollback-<time> is taken first: roll back to it to undo. "
                                    + when_help, epilog=EPILOG, formatter_class=fmt)
    common(rb, "a file, a directory or the root, inside MNT or SRC (default: the current directory)", optional=True)
    rb.add_argument("--to", metavar="WHEN", required=True, help="the moment (also a guard-<time> snapshot)")
    rb.add_argument("-n", "--dry-run", action="store_true", help="list what would change, change nothing")
    rb.add_argument("--json", action="store_true", help="print a JSON summary")
    rb.set_defaults(func=cmd_rollback)


# ---- verify and compact (docs/cli.md "deltafs verify", "deltafs compact")

def cmd_verify(args: argparse.Namespace) -> int:
    from deltafs import maintenance
    from deltafs.errors import EXIT_JOURNAL
    from deltafs.journal import Journal
    from deltafs.locate import locate

    if args.mirror:
        return cmd_verify_mirror(args)
    loc = locate(args.path, args.journal)
    with Journal.open(loc.journal, readonly=True) as j:
        res = maintenance.verify(j, full=args.full)
        drift = maintenance.tree_drift(j, loc.src, loc.journal) if args.full and loc.src and res.ok else []
    for d in drift:  # the current tree against SRC (docs/cli.md "deltafs verify")
        print(f"DIFFERS {os.fsdecode(d.path)}: {d.what}" + (
            f"; versions recorded under it from another file: {', '.join(map(str, d.suspect))}" if d.suspect else ""),
            file=sys.stderr if args.json else sys.stdout)
    if args.json:
        _print_json({**res.to_dict(), "tree_differs": [d.to_dict() for d in drift]})
    elif res.ok:
        what = f", {res.versions_checked} versions and {res.chunks_checked} chunks checked" if args.full else ""
        print(f"ok: {res.records} records, hash chain intact{what}")
    else:
        p = res.problem
        where = f"version {p.seq}" if p.seq is not None else "journal"
        if p.path is not None:
            where += f" ({p.path.decode('utf-8', 'surrogateescape') or '/'})"
        print(f"BROKEN at {where}: {p.what}")
    return EXIT_JOURNAL if not res.ok else 1 if drift else 0


def cmd_compact(args: argparse.Namespace) -> int:
    from deltafs import maintenance
    from deltafs.errors import JournalLockedError
    from deltafs.journal import Journal
    from deltafs.locate import locate

    from deltafs.config import retention_from_args

    policy = retention_from_args(args.retention, args.coalesce)  # bad values: exit 2 before anything
    loc = locate(args.path, args.journal)
    if not args.dry_run:
        from deltafs.guard import refuse_compaction_while_alerted

        refuse_compaction_while_alerted(loc.journal, loc.mnt or args.path)
    if loc.mount is not None and args.vacuum and not args.dry_run:
        raise JournalLockedError(f"compact --vacuum needs the journal unmounted: {loc.mnt} is mounted "
                                 f"on it (deltafs umount {loc.mnt}, then run it again; without "
                                 "--vacuum, compact runs through the mount)")
    # the daemon is the journal's only writer: it runs the pass when there is one
    out = _ask_daemon(loc.journal, loc.mount, "compact", None, dry_run=args.dry_run, retention=args.retention,
                      coalesce=args.coalesce)
    rep = out["report"] if out is not None else None
    if rep is None:
        try:
            j = Journal.open(loc.journal)
        except JournalLockedError as e:
            raise JournalLockedError(f"{e}: another deltafs process holds its write lock; try again "
                                     "once it is done") from None
        try:
            r = maintenance.compact(j, policy, dry_run=args.dry_run)
            if args.vacuum and not args.dry_run:
                r.data_file_before, r.data_file_after = maintenance.vacuum(j)  # closes j
        finally:
            j.close()  # closed already after a vacuum: nothing happens
        rep = r.to_dict()
    if args.json:
        _print_json(rep)
    else:
        verb = "would prune" if args.dry_run else "pruned"
        print(f"{verb} {rep['versions_pruned']} of {rep['versions']} versions in {rep['files']} files, "
              f"freeing {rep['chunks_freed']} chunks ({rep['bytes_freed']} bytes); "
              f"{rep['checkpoints_written']} checkpoints written, {rep['chunks_rebased']} chunks re-coded"
              + (f"; {rep['chunks_recoded']} chunk values re-coded smaller (-{rep['recode_bytes_saved']} bytes)"
                 if rep.get("chunks_recoded") else ""))
        if rep["data_file_before"] is not None:
            print(f"vacuum: data.mdb {rep['data_file_before']} -> {rep['data_file_after']} bytes")
    return 0


def _add_maintenance_parsers(sub) -> None:
    from deltafs.config import add_retention_options

    fmt = argparse.HelpFormatter

    def common(q) -> None:
        q.add_argument("path", metavar="PATH", nargs="?",
                       help="a path inside MNT or SRC (default: the current directory)")
        q.add_argument("--journal", metavar="DIR", help="use this journal directly")
        q.add_argument("--json", action="store_true", help="print a JSON report")

    v = sub.add_parser("verify", help="check the journal's hash chain (and with --full every chunk)",
                       description="Walk the journal's hash chain; with --full also rebuild every "
                                   "retained version's chunk list and decompress and hash every chunk "
                                   "it names. Stops at the first problem and names it (version, path, "
                                   "what is wrong); exit status 3 then. Safe while mounted.",
                       epilog=EPILOG, formatter_class=fmt)
    common(v)
    v.add_argument("--full", action="store_true", help="also check every chunk of every retained version")
    v.add_argument("--mirror", metavar="URL",
                   help="verify this mirror instead: manifest, chain across segments, pack chunks "
                        "(a sample of packs; with --full every pack)")
    v.add_argument("--endpoint-url", metavar="URL", help="S3 endpoint for an s3:// --mirror")
    secret_options(v)
    v.set_defaults(func=cmd_verify)

    c = sub.add_parser("compact", help="apply retention now and free unreferenced chunks",
                       description="Thin old versions by the retention policy (every version for 24 h, "
                                   "hourly for 7 days, daily for 90 days, weekly after; bursts of saves "
                                   "within 10 s keep their last; the newest version of each file and "
                                   "versions named by snapshots are kept) and free chunks nothing refers "
                                   "to. While mounted, the mount's daemon runs the pass (with the mount's "
                                   "retention unless --retention/--coalesce are given); --vacuum needs "
                                   "the journal unmounted.",
                       epilog=EPILOG, formatter_class=fmt)
    common(c)
    c.add_argument("-n", "--dry-run", action="store_true", help="report what would be pruned, change nothing")
    c.add_argument("--vacuum", action="store_true",
                   help="then rewrite data.mdb compactly so the file shrinks on disk")
    add_retention_options(c)
    c.set_defaults(func=cmd_compact)


# ---- mirrors (docs/cli.md "Mirrors")

def _mirror_journal(args: argparse.Namespace):
    """-> (journal dir, mount entry or None) from --journal / -m PATH / the current directory."""
    from deltafs.locate import locate

    loc = locate(args.mount, args.journal)
    return loc.journal, loc.mount


def _optional_journal(args: argparse.Namespace, path: str | None = None):
    """Like _mirror_journal, but (None, None) when no journal is named or found."""
    from deltafs.errors import UsageError
    from deltafs.locate import locate

    where = path or getattr(args, "mount", None)
    named = where or args.journal
    try:
        loc = locate(where, args.journal)
    except UsageError:
        if named:
            raise
        return None, None
    return loc.journal, loc.mount


def _prompt(text: str) -> str:
    import getpass

    try:
        return getpass.getpass(text)
    except EOFError:
        return ""


def _secrets(args: argparse.Namespace, *, new: bool = False, source: bool = False):
    """Where a mirror command takes its passphrase or key from (docs/mirrors.md)."""
    from deltafs.mirrors.keys import NEW_PASSPHRASE_ENV, PASSPHRASE_ENV, SOURCE_PASSPHRASE_ENV, Secrets

    prompt = _prompt if sys.stdin.isatty() else None
    if source:
        return Secrets(key_file=args.from_key_file, prompt=prompt, env_var=SOURCE_PASSPHRASE_ENV)
    if new:
        return Secrets(passphrase_file=args.new_passphrase_file, prompt=prompt, env_var=NEW_PASSPHRASE_ENV)
    return Secrets(passphrase_file=getattr(args, "passphrase_file", None), key_file=getattr(args, "key_file", None),
                   prompt=prompt, env_var=PASSPHRASE_ENV)


def cmd_mirror_sync(args: argparse.Namespace) -> int:
    from deltafs.errors import JournalLockedError
    from deltafs.journal import Journal
    from deltafs.mirrors import keys, open_mirror
    from deltafs.mirrors.replicate import record_status, replicate_once

    if args.to_encrypted:
        return _sync_to_encrypted(args)
    jdir, _ = _mirror_journal(args)
    backend = open_mirror(args.url, endpoint_url=args.endpoint_url)
    with backend:
        mirror = keys.open_for_journal(backend, jdir)
        if mirror is backend:  # no stored key: plain, or unlocked with the passphrase or key file
            mirror = keys.open_reader(backend, _secrets(args), (jdir,))
    try:
        j = Journal.open(jdir)
    except JournalLockedError:  # a running mount: replicate read-only, the manifest is the cursor
        j = Journal.open(jdir, readonly=True)
    with j, mirror:
        stats = replicate_once(j, mirror)
        record_status(j, mirror.url, stats)
    if args.json:
        _print_json(stats.to_dict())
    else:
        print(f"{mirror.url}: shipped {stats.records} records ({stats.packs} packs, {stats.bytes} bytes); "
              f"mirror at record {stats.last_seq} of {stats.head_seq}")
    return 0


def _sync_to_encrypted(args: argparse.Namespace) -> int:
    """mirror sync URL --to-encrypted NEW_URL: copy every object into a new encrypted mirror."""
    from deltafs.mirrors import keys, open_mirror
    from deltafs.mirrors.convert import copy_mirror
    from deltafs.mirrors.encrypted import EncryptedMirror

    jdir, mount = _optional_journal(args)
    jdirs = (jdir,) if jdir else ()
    src_backend = open_mirror(args.url, endpoint_url=args.endpoint_url)
    dst_backend = open_mirror(args.to_encrypted, endpoint_url=args.endpoint_url)
    if dst_backend.url == src_backend.url:
        from deltafs.errors import UsageError
        raise UsageError("--to-encrypted needs another URL than the mirror it copies")
    with src_backend, dst_backend:
        src = keys.open_reader(src_backend, _secrets(args, source=True), jdirs)
        dst_backend.check()
        key = keys.add_or_unlock(dst_backend, _secrets(args), encrypt=True)
        if getattr(src, "key", None) is not None and src.key.key_id == key.key_id:
            from deltafs.errors import UsageError
            raise UsageError(f"{dst_backend.url} has the same key as {src_backend.url}; copy into a new mirror")
        rep = copy_mirror(src, EncryptedMirror(dst_backend, key, keys.seen_store(key, jdirs)))
        registered = jdir is not None and _register_key(jdir, mount, dst_backend.url, args.endpoint_url, key,
                                                        only_if=src_backend.url)
    if args.json:
        _print_json({**rep.to_dict(), "key_id": key.key_id, "registered": registered})
    else:
        print(f"copied {rep.objects} objects ({rep.bytes} bytes; {rep.skipped} already there) of {rep.source} "
              f"into encrypted mirror {rep.dest} (key id {key.key_id}); it holds records up to {rep.last_seq}")
        if registered:
            print(f"the journal now replicates to {rep.dest} too; stop using the old one with "
                  f"`deltafs mirror remove {rep.source}`")
    return 0


def _register_key(jdir: str, mount, url: str, endpoint_url: str | None, key, only_if: str | None = None) -> bool:
    """Register mirror ``url`` in the journal with its key (through the daemon when mounted).
    ``only_if``: only when that mirror is registered there.  -> registered."""
    from deltafs import control
    from deltafs.journal import Journal
    from deltafs.mirrors import keys, registry

    with Journal.open(jdir, readonly=True) as j, j.reader() as r:
        registered = {m["url"] for m in registry.configured(r)}
    if only_if is not None and only_if not in registered:
        return False
    stored = keys.KeyStore(jdir).load(url)
    if url in registered and (key is None or (stored is not None and stored.key_id == key.key_id)):
        return True  # already so
    if mount is not None:
        control.request(jdir, "mirror_register", url=url, endpoint_url=endpoint_url,
                        **({"key": keys.key_to_wire(key)} if key is not None else {}))
        return True
    if key is not None:
        keys.KeyStore(jdir).save(url, key)
    with Journal.open(jdir) as j:
        registry.add(j, url, endpoint_url)
    return True


def cmd_mirror_register(args: argparse.Namespace) -> int:
    """mirror add / mirror remove: registered in the journal, used by every mount of it."""
    from deltafs import control
    from deltafs.journal import Journal
    from deltafs.mirrors import keys, open_mirror, registry

    remove = args.mirror_command == "remove"
    jdir, mount = _mirror_journal(args)
    mirror = open_mirror(args.url, endpoint_url=getattr(args, "endpoint_url", None))
    url = mirror.url
    key = None
    if not remove:
        with mirror:
            mirror.check()  # an unreachable mirror or wrong credentials: say so now
            # an encrypted mirror (or a new one with --encrypt): its key, kept in the journal
            key = keys.add_or_unlock(mirror, _secrets(args), encrypt=args.encrypt,
                                     stored=keys.KeyStore(jdir).load(url))
    active = started = False
    if mount is not None:  # the daemon is the journal's only writer
        resp = control.request(jdir, "mirror_register", url=url, remove=remove,
                               endpoint_url=getattr(args, "endpoint_url", None),
                               **({"key": keys.key_to_wire(key)} if key is not None else {}))
        changed, active, started = resp["changed"], resp["active"], resp.get("started", False)
    else:
        if key is not None:
            keys.KeyStore(jdir).save(url, key)
        with Journal.open(jdir) as j:
            changed = (registry.remove(j, url) if remove
                       else registry.add(j, url, getattr(args, "endpoint_url", None)))
    if remove and not changed:
        from deltafs.errors import NotFoundError
        raise NotFoundError(f"{url} is not a registered mirror of {jdir}")
    if remove:
        keys.KeyStore(jdir).remove(url)
    if args.json:
        _print_json({"url": url, "registered": not remove, "changed": changed, "mounted": mount is not None,
                     "encrypted": key is not None, "key_id": key.key_id if key else None, "started": started})
    elif remove:
        note = " (the running mount keeps replicating to it until it is unmounted)" if active else ""
        print(f"removed mirror {url}{note}")
    else:
        what = f"encrypted mirror {url} (key id {key.key_id})" if key is not None else f"mirror {url}"
        if started:
            note = "; the running mount replicates to it now"
        elif mount is not None and not active:
            note = ("; the running mount replicates to it from its next mount on — "
                    f"`deltafs mirror sync {url}` ships everything now")
        else:
            note = ""
        print(f"added {what}: every mount of this journal replicates to it{note}")
    return 0


def cmd_mirror_passwd(args: argparse.Namespace) -> int:
    from deltafs.mirrors import keys, open_mirror

    with open_mirror(args.url, endpoint_url=args.endpoint_url) as mirror:
        blob = keys.passwd(mirror, _secrets(args), _secrets(args, new=True))
    if args.json:
        _print_json({"url": mirror.url, "key_id": blob.key_id, "kdf": {k: v for k, v in blob.kdf.to_dict().items()
                                                                         if k != "salt"}})
    else:
        print(f"changed the passphrase of {mirror.url} (key id {blob.key_id}); the old one no longer opens it")
    return 0


def cmd_mirror_key(args: argparse.Namespace) -> int:
    from deltafs.mirrors import crypto, keys, open_mirror

    with open_mirror(args.url, endpoint_url=args.endpoint_url) as backend:
        if args.key_command == "export":
            jdir, _ = _optional_journal(args)
            key = keys.export_key(backend, _secrets(args), (jdir,) if jdir else ())
            text = crypto.export_key(key, backend.url)
            if args.output and args.output != "-":
                keys.write_key_file(args.output, key, backend.url)
                print(f"wrote the key of {backend.url} (key id {key.key_id}) to {args.output}: keep it safe",
                      file=sys.stderr)
            else:
                sys.stdout.write(text)
            return 0
        key = keys.Secrets(key_file=args.file).load_key_file()
        had = keys.import_key(backend, key, _secrets(args), key_file=args.file)
    print(f"{'replaced' if had else 'wrote'} the key blob of {backend.url} (key id {key.key_id}): it opens with "
          "the new passphrase")
    return 0


def cmd_mirror_list(args: argparse.Namespace) -> int:
    from deltafs import mounttable, status
    from deltafs.journal import Journal
    from deltafs.mirrors import keys

    jdir, mount = _mirror_journal(args)
    with Journal.open(jdir, readonly=True) as j, j.reader() as r:
        rows = {d["url"]: d for d in status.stored_mirrors(r)}  # lag computed now, not copied
        head = r.head_seq()
    rec = (mounttable.read_record(mount.mnt) or {}) if mount else {}
    out = _ask_daemon(jdir, mount, "status", 10)  # the running mount's view is the freshest
    live = {mi["url"]: mi for mi in out["status"]["mirrors"]} if out is not None else {}
    for url in [*rec.get("mirrors", []), *live]:
        rows.setdefault(url, {"url": url, "seq": None, "head_seq": head, "registered": False})
    store = keys.KeyStore(jdir)
    for url in sorted(rows):
        d = rows[url]
        if url in live:
            keep = ("seq", "head_seq", "lag_records", "lag_seconds", "last_success_ns", "last_error",
                    "failures", "state")
            d.update({k: live[url].get(k) for k in keep})
        d["configured"] = url in rec.get("mirrors", [])
        d["registered"] = bool(d.get("registered"))
        key = store.load(url)
        d["encrypted"], d["key_id"] = key is not None, key.key_id if key else None
        if args.json:
            _print_json(d)
        else:
            err = f"  error: {d['last_error']}" if d.get("last_error") else ""
            enc = f"\tencrypted (key id {d['key_id']})" if d["encrypted"] else ""
            print(f"{url}\tat {d.get('seq')} of {d.get('head_seq', head)}\tlag {d.get('lag_records', '?')} "
                  f"records{enc}{err}")
    return 0


def cmd_clone(args: argparse.Namespace) -> int:
    import shutil

    from deltafs import history
    from deltafs.errors import UsageError
    from deltafs.mirrors import keys, open_mirror
    from deltafs.mirrors.clone import check_when, clone_journal
    from deltafs.when import parse_when

    dest = os.path.abspath(args.dest)
    if os.path.lexists(dest) and (not os.path.isdir(dest) or os.listdir(dest)):
        raise UsageError(f"{args.dest} exists and is not an empty directory")
    if args.join or _is_group_store(args):
        return _clone_group(args, dest)
    if args.at is not None:
        parse_when(args.at)  # a WHEN that does not parse: refused before the mirror is opened
    made = not os.path.lexists(dest)
    backend = open_mirror(args.mirror, endpoint_url=args.endpoint_url)
    try:
        mirror = keys.open_reader(backend, _secrets(args))  # encrypted: unlocked before DEST is touched
    except BaseException:
        backend.close()
        raise
    jdir = os.path.join(dest, ".deltafs")
    try:
        with mirror:
            if args.at is not None:
                check_when(mirror, args.at)  # before anything is downloaded
            os.makedirs(dest, exist_ok=True)
            rep = clone_journal(mirror, jdir)
            keys.remember_in(mirror, jdir)  # the clone's journal knows the versions it saw (rollbacks)
        tree = history.restore(jdir, b"", at=args.at, dest=dest, force=True)
    except BaseException:
        shutil.rmtree(dest if made else jdir, ignore_errors=True)
        raise
    _report_restore(tree, args.nearest)
    if args.json:
        _print_json({**rep.to_dict(), "restore": tree.to_dict()})
    else:
        print(f"cloned {rep.records} records from {rep.mirror} into {jdir}; {tree.summary()}")
    return history.restore_exit_code(tree, args.nearest)


def _is_group_store(args: argparse.Namespace) -> bool:
    from deltafs import sync

    return sync.is_group_store(args.mirror, args.endpoint_url)


def _clone_group(args: argparse.Namespace, dest: str) -> int:
    """clone of a sync group's store: its merged tree; a new member with --join (docs/sync.md)."""
    import shutil

    from deltafs import sync
    from deltafs.errors import UsageError
    from deltafs.journal import Journal

    if args.at is not None:
        raise UsageError("--at is not supported for a sync group's store: clone, then `deltafs restore --at`")
    made = not os.path.lexists(dest)
    os.makedirs(dest, exist_ok=True)
    jdir = os.path.join(dest, ".deltafs")
    try:
        with Journal.open(jdir, create=True) as j:
            rep = sync.clone(j, dest, args.mirror, join=args.join, endpoint_url=args.endpoint_url,
                             secrets=_secrets(args))
    except BaseException:
        shutil.rmtree(dest if made else jdir, ignore_errors=True)
        raise
    if args.json:
        _print_json({"group": args.mirror, "joined": args.join, "journal": jdir, **rep})
    else:
        print(f"cloned the group at {args.mirror} into {dest}: {rep['applied']} path(s), "
              f"{rep['open_conflicts']} conflict(s) open" + ("; this tree is a member now" if args.join else ""))
    return 0


def cmd_verify_mirror(args: argparse.Namespace) -> int:
    from deltafs.errors import EXIT_MIRROR
    from deltafs.mirrors import keys, open_mirror
    from deltafs.mirrors.clone import verify_mirror

    jdir, _ = _optional_journal(args, args.path)  # a journal that has seen the mirror knows its versions
    with open_mirror(args.mirror, endpoint_url=args.endpoint_url) as backend:
        mirror = keys.open_reader(backend, _secrets(args), (jdir,) if jdir else ())
        rep = verify_mirror(mirror, full=args.full)
    key = getattr(mirror, "key", None)
    for e in rep.errors:
        print(f"deltafs: {mirror.url}: {e}", file=sys.stderr)
    if args.json:
        _print_json({**rep.to_dict(), "encrypted": key is not None, "key_id": key.key_id if key else None})
    elif not rep.errors:
        enc = f" (encrypted, key id {key.key_id})" if key is not None else ""
        print(f"{mirror.url}: ok{enc}: {rep.records} records in {rep.segments} segments, "
              f"{rep.chunks_checked} chunks in {rep.packs_checked} of {rep.packs} packs checked")
    return EXIT_MIRROR if rep.errors else 0


def secret_options(q, key_file: bool = True) -> None:
    """--passphrase-file and --key-file of the commands that open an encrypted mirror."""
    q.add_argument("--passphrase-file", metavar="FILE",
                   help="an encrypted mirror's passphrase, from FILE (else $DELTAFS_PASSPHRASE, else a prompt "
                        "on a terminal)")
    if key_file:
        q.add_argument("--key-file", metavar="FILE",
                       help="an encrypted mirror's key file (deltafs mirror key export) instead of a passphrase")


def _add_mirror_parsers(sub) -> None:
    fmt = argparse.HelpFormatter

    def where(q) -> None:
        q.add_argument("--journal", metavar="DIR", help="the journal to use (default: found from -m or the cwd)")
        q.add_argument("-m", "--mount", metavar="PATH", help="a path inside MNT or SRC of the journal")

    def endpoint(q) -> None:
        q.add_argument("--endpoint-url", metavar="URL", help="S3 endpoint for s3:// mirrors (self-hosted S3)")

    mi = sub.add_parser("mirror", help="replicate the journal to mirrors, list them",
                        description="Mirrors are copies of the journal in a directory (file:///path) or "
                                    "an S3 bucket (s3://bucket/prefix); see docs/mirrors.md.",
                        epilog=EPILOG, formatter_class=fmt)
    msub = mi.add_subparsers(dest="mirror_command", metavar="COMMAND")
    msub.required = True
    sy = msub.add_parser("sync", help="one replication pass now",
                         description="Ship every record and chunk the mirror lacks, now. Works while the "
                                     "journal is mounted (it then only reads the journal; the mirror's "
                                     "manifest is the cursor).", epilog=EPILOG, formatter_class=fmt)
    sy.add_argument("url", metavar="URL")
    where(sy)
    endpoint(sy)
    secret_options(sy)
    sy.add_argument("--to-encrypted", metavar="NEW_URL",
                    help="instead: copy every object of mirror URL (plain or encrypted) into NEW_URL, a new "
                         "encrypted mirror with a new key (resumable); the journal then replicates to it too")
    sy.add_argument("--from-key-file", metavar="FILE",
                    help="with --to-encrypted: the key file of URL when it is encrypted and the journal holds "
                         "no key for it (else its passphrase is asked, or read from $DELTAFS_FROM_PASSPHRASE)")
    sy.add_argument("--json", action="store_true", help="print the pass's statistics as JSON")
    sy.set_defaults(func=cmd_mirror_sync)
    for verb, text in (("add", "register a mirror: every mount of the journal replicates to it"),
                       ("remove", "unregister a mirror (its copy is left as it is)")):
        mr = msub.add_parser(verb, help=text,
                             description=text[0].upper() + text[1:] + ". Stored in the journal (through "
                             "the daemon when mounted); `deltafs mount --mirror URL` adds one for a "
                             "single mount instead.", epilog=EPILOG, formatter_class=fmt)
        mr.add_argument("url", metavar="URL")
        where(mr)
        if verb == "add":
            endpoint(mr)
            mr.add_argument("--encrypt", action="store_true",
                            help="make a new (empty) mirror an encrypted one: a new key, wrapped by a passphrase "
                                 "(or written to --key-file). An encrypted mirror is recognised without it")
            secret_options(mr)
        mr.add_argument("--json", action="store_true", help="print the result as JSON")
        mr.set_defaults(func=cmd_mirror_register)
    pw = msub.add_parser("passwd", help="change the passphrase of an encrypted mirror",
                         description="Wrap the mirror's data key under a new passphrase (Argon2id parameters "
                                     "calibrated anew). Nothing else is re-encrypted; the old passphrase no "
                                     "longer opens the mirror. The current one comes from --passphrase-file, "
                                     "$DELTAFS_PASSPHRASE or a prompt (or give --key-file); the new one from "
                                     "--new-passphrase-file, $DELTAFS_NEW_PASSPHRASE or a prompt.",
                         epilog=EPILOG, formatter_class=fmt)
    pw.add_argument("url", metavar="URL")
    endpoint(pw)
    secret_options(pw)
    pw.add_argument("--new-passphrase-file", metavar="FILE", help="read the new passphrase from FILE")
    pw.add_argument("--json", action="store_true", help="print the result as JSON")
    pw.set_defaults(func=cmd_mirror_passwd)
    ky = msub.add_parser("key", help="export or import the key of an encrypted mirror (backup)",
                         description="export: print (or write to -o FILE, mode 0600) the mirror's data key "
                                     "as a key file, a backup for paper or a safe place; it opens the mirror "
                                     "without the passphrase. import: write a new key blob into the mirror from "
                                     "such a backup, under a new passphrase (a lost or corrupted blob, a "
                                     "forgotten passphrase).", epilog=EPILOG, formatter_class=fmt)
    ksub = ky.add_subparsers(dest="key_command", metavar="ACTION")
    ksub.required = True
    ke = ksub.add_parser("export", help="print or write the data key", epilog=EPILOG, formatter_class=fmt)
    ke.add_argument("url", metavar="URL")
    ke.add_argument("-o", "--output", metavar="FILE", help="write it to FILE (never overwritten) instead of stdout")
    where(ke)
    endpoint(ke)
    secret_options(ke, key_file=False)
    ke.set_defaults(func=cmd_mirror_key)
    ki = ksub.add_parser("import", help="write a new key blob from a key file", epilog=EPILOG, formatter_class=fmt)
    ki.add_argument("url", metavar="URL")
    ki.add_argument("file", metavar="KEYFILE")
    endpoint(ki)
    ki.add_argument("--passphrase-file", metavar="FILE",
                    help="the new passphrase (else $DELTAFS_PASSPHRASE, else a prompt)")
    ki.set_defaults(func=cmd_mirror_key)
    ls = msub.add_parser("list", help="mirrors of a journal and their lag", epilog=EPILOG, formatter_class=fmt)
    where(ls)
    ls.add_argument("--json", action="store_true", help="JSON Lines, one object per mirror")
    ls.set_defaults(func=cmd_mirror_list)

    cl = sub.add_parser("clone", help="rebuild a journal and its tree from a mirror",
                        description="Rebuild DEST/.deltafs (every record and chunk of the mirror, same "
                                    "version ids) and the tree at WHEN (default: the latest) in DEST. "
                                    "DEST must be missing or empty.", epilog=EPILOG, formatter_class=fmt)
    cl.add_argument("mirror", metavar="MIRROR")
    cl.add_argument("dest", metavar="DEST")
    cl.add_argument("--at", metavar="WHEN", help="the tree at WHEN (default: the latest)")
    _add_nearest(cl)
    endpoint(cl)
    secret_options(cl)
    cl.add_argument("--join", action="store_true",
                    help="MIRROR is a sync group's store: DEST becomes a member of the group (docs/sync.md)")
    cl.add_argument("--json", action="store_true", help="print a JSON summary")
    cl.set_defaults(func=cmd_clone)


def _group_journal(args: argparse.Namespace, write: bool = True):
    """-> (journal dir, SRC, mount entry or None) of the tree a group command works on."""
    from deltafs.errors import UsageError
    from deltafs.locate import locate

    loc = locate(args.mount, args.journal)
    if loc.src is None:
        raise UsageError(f"the journal {loc.journal} is not SRC/.deltafs of a tree: name the tree with -m SRC")
    return loc.journal, loc.src, loc.mount


def _print_pass(rep, as_json: bool) -> None:
    if as_json:
        _print_json(dict(rep))
        return
    print(f"published {rep['published']}, received {rep['received']}, applied {rep['applied']}; "
          f"{rep['open_conflicts']} conflict(s) open" + (f", {rep['pending']} waiting" if rep["pending"] else ""))


def cmd_group(args: argparse.Namespace) -> int:
    import time

    from deltafs import sync
    from deltafs.journal import Journal

    verb = args.group_command
    jdir, src, mount = _group_journal(args)
    if mount is not None and verb != "list":
        from deltafs import control
        from deltafs.errors import UsageError

        if verb != "sync":
            raise UsageError(f"{mount.mnt} is mounted: `group {verb}` works on an unmounted tree (unmount, "
                             f"{verb}, mount again)")
        _print_pass(control.request(jdir, "group", timeout=600)["report"], args.json)
        return 0
    if verb == "list":
        st = sync.membership(jdir)
        if st is None:
            from deltafs.errors import UsageError
            raise UsageError(f"journal {jdir} is in no sync group (`deltafs group join URL`)")
        peers = sync.peers(jdir)
        if args.json:
            _print_json({"url": st.url, "device": st.device, "name": st.name, "group_id": st.group_id,
                         "published": st.published, "conflicts": len(st.conflicts), "peers": peers})
            return 0
        print(f"group {st.url} (id {st.group_id}); this member: {st.device} {st.name}, "
              f"{st.published} events published, {len(st.conflicts)} conflict(s) open")
        now = time.time_ns()
        for p in peers:
            age = f"{(now - p['last_seen_ns']) / 1e9:.0f}s ago" if p["last_seen_ns"] else "never"
            print(f"  {p['device']} {p['name'] or '-':<16} last seen {age}, {p['events']} events, "
                  f"pending in {p['pending_in']}, out {p['pending_out']}" + (" (left)" if p["left"] else ""))
        return 0
    with Journal.open(jdir) as j:
        if verb == "join":
            st = sync.join(j, args.url, name=args.name or "", endpoint_url=args.endpoint_url,
                           secrets=_secrets(args), encrypt=args.encrypt, conflict_copies=args.conflict_copies)
            rep = sync.run_pass(j, src)
            if args.json:
                _print_json({"url": st.url, "device": st.device, "group_id": st.group_id, **rep})
            else:
                print(f"joined group {st.url} as device {st.device}")
                _print_pass(rep, False)
        elif verb == "leave":
            st = sync.leave(j)
            if args.json:
                _print_json({"url": st.url, "device": st.device, "left": True})
            else:
                print(f"left group {st.url}; this tree is no longer synced")
        else:  # sync
            _print_pass(sync.run_pass(j, src), args.json)
    return 0


def cmd_conflicts(args: argparse.Namespace) -> int:
    from deltafs import sync

    jdir, _, _ = _group_journal(args)
    rows = sync.conflicts(jdir)
    for c in rows:
        if args.json:
            _print_json(c)
            continue
        def one(d):
            return "deleted" if d["deleted"] else f"{d['version']} ({d.get('size') or 0} bytes)"
        print(f"{c['path']}: local {one(c['local'])}; remote " + ", ".join(one(h) for h in c["remote"]))
    if not rows and not args.json:
        print("no open conflicts")
    return 0


def cmd_resolve(args: argparse.Namespace) -> int:
    from deltafs import sync
    from deltafs.errors import UsageError
    from deltafs.journal import Journal

    if bool(args.all) == bool(args.path):
        raise UsageError("give PATH or --all")
    if bool(args.take) == bool(args.merge):
        raise UsageError("give --take local|remote|DEVICE:N or --merge")
    if args.merge:
        args.take = "merge"
    elif args.take not in ("local", "remote") and ":" not in args.take:
        raise UsageError(f"--take {args.take!r}: give local, remote or DEVICE:N (from `deltafs conflicts`)")
    jdir, src, mount = _group_journal(args)
    if args.all:
        paths = [os.fsencode(c["path"]) for c in sync.conflicts(jdir)]
    else:
        from deltafs.locate import locate

        paths = [locate(args.path, jdir).rel]
    done = []
    if mount is not None:  # the daemon resolves, in a pass of its sync service
        from deltafs import control

        if paths:
            resp = control.request(jdir, "group", timeout=600, action="resolve", take=args.take,
                                   paths=[os.fsdecode(p) for p in paths], keep_going=args.all)
            done = list(zip(paths, resp["all"]))
    else:
        with Journal.open(jdir) as j:
            done = list(zip(paths, sync.resolve_many(j, src, paths, args.take, keep_going=args.all)
                            if paths else []))
    rc = 0
    for p, d in done:  # --all goes on past a path that does not resolve: one line each, exit 1 (2) at the end
        if args.json:
            _print_json({"path": os.fsdecode(p), **d})
        elif "error" in d:
            _err(d["error"])
        else:
            print(f"{os.fsdecode(p)}: " + ("merged" if args.merge else f"resolved with {args.take}")
                  + f" ({d['version']})")
        if "error" in d:
            rc = max(rc, int(d.get("exit_code") or 2))
    if not done and not args.json:
        print("no open conflicts")
    return rc


def _add_sync_parsers(sub) -> None:
    fmt = argparse.RawDescriptionHelpFormatter

    def where(q) -> None:
        q.add_argument("-m", "--mount", metavar="PATH", help="the tree (SRC) or mount (default: the current directory)")
        q.add_argument("--journal", metavar="DIR", help="the journal (DIR of SRC/.deltafs)")
        q.add_argument("--json", action="store_true", help="print JSON")

    g = sub.add_parser("group", help="sync this tree with other machines through a shared store",
                       description="Sync groups (docs/sync.md): every member publishes its changes into a "
                                   "shared store (a mirror URL) and applies the others'; concurrent edits become "
                                   "conflicts kept as branches of a file's history, never files in the tree.",
                       epilog=EPILOG, formatter_class=fmt)
    gs = g.add_subparsers(dest="group_command", metavar="VERB")
    gs.required = True
    j = gs.add_parser("join", help="join the group stored at URL (a new group if the store is empty)",
                      epilog=EPILOG, formatter_class=fmt)
    j.add_argument("url", metavar="URL", help="file:///path or s3://bucket/prefix")
    j.add_argument("--name", help="this member's name as others see it (default: the host name)")
    j.add_argument("--endpoint-url", metavar="URL", help="S3 endpoint for s3:// stores (self-hosted S3)")
    j.add_argument("--encrypt", action="store_true", help="a new (empty) store is made encrypted")
    j.add_argument("--conflict-copies", action="store_true",
                   help="on this member, also write each conflict's remote version as NAME.conflict-DEVICE-N.EXT "
                        "beside the file (never published; docs/sync.md)")
    secret_options(j)
    where(j)
    for verb, text in (("list", "the group and its members: last seen, lag, pending in and out"),
                       ("leave", "stop syncing this tree (its stream stays in the store, marked left)"),
                       ("sync", "one pass now: publish local changes, apply the others' (unmounted tree)")):
        q = gs.add_parser(verb, help=text, description=text[0].upper() + text[1:] + ".", epilog=EPILOG,
                          formatter_class=fmt)
        where(q)
    g.set_defaults(func=cmd_group)
    c = sub.add_parser("conflicts", help="list open sync conflicts", epilog=EPILOG, formatter_class=fmt,
                       description="Paths changed concurrently on two members: the local state stays in the tree, "
                                   "each remote version is kept as a branch (JSON Lines with --json).")
    where(c)
    c.set_defaults(func=cmd_conflicts)
    r = sub.add_parser("resolve", help="end a sync conflict", epilog=EPILOG, formatter_class=fmt,
                       description="End the conflict on PATH (or every one with --all) with the local version, "
                                   "the remote one, a named version DEVICE:N (from `deltafs conflicts`), or a "
                                   "three-way merge of the two (--merge); every "
                                   "member takes the result.")
    r.add_argument("path", metavar="PATH", nargs="?", help="a path in the tree (relative to SRC)")
    r.add_argument("--all", action="store_true", help="every open conflict")
    r.add_argument("--take", metavar="local|remote|DEVICE:N")
    r.add_argument("--merge", action="store_true",
                   help="a three-way text merge of the local and the remote version, from their common ancestor "
                        "(git merge-file); overlapping changes: the file gets conflict markers and the conflict "
                        "stays open (exit 1)")
    where(r)
    r.set_defaults(func=cmd_resolve)


def build_parser() -> argparse.ArgumentParser:
    from deltafs.config import MountConfig

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
    m.add_argument("mnt", metavar="MNT", nargs="?", help="an empty directory to mount it on")
    m.add_argument("--at", metavar="WHEN", help="mount the tree as it was at WHEN, read-only (time, "
                   "'10 minutes ago', version id, snapshot name); with --journal DIR, give MNT only")
    m.add_argument("--cache-size", metavar="SIZE", help="with --at: decoded-chunk cache size (default 64M)")
    m.add_argument("--journal", metavar="DIR", help="where the journal lives (default SRC/.deltafs)")
    MountConfig.add_arguments(m)  # every option the daemon runs with: deltafs/config.py
    m.add_argument("--encrypt", action="store_true",
                   help="the --mirror URLs are encrypted: a new (empty) one gets a new key, an existing one is "
                        "unlocked; the key is kept in the journal, so later mounts need no passphrase "
                        "(with --group alone: a new group store is made encrypted)")
    secret_options(m)
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
    _add_maintenance_parsers(sub)
    _add_history_parsers(sub)
    _add_mirror_parsers(sub)
    _add_control_parsers(sub)
    _add_sync_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except DeltafsError as e:
        _err(str(e))  # one line, whatever a file name in it holds
        return e.exit_code
    except KeyboardInterrupt:
        print("deltafs: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
