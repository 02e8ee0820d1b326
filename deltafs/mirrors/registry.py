"""Mirrors registered in a journal (`deltafs mirror add|remove`).

A journal setting ``mirrors`` holds ``[{"url": ..., "endpoint_url": ...}]``;
every mount of that journal replicates to them, in addition to the
``--mirror`` options given on its command line.  Only the journal's writer
changes it: the CLI directly when nothing is mounted, else the daemon
through its control socket.
"""

from __future__ import annotations

SETTING = "mirrors"


def configured(reader) -> list[dict]:
    return [dict(m) for m in reader.setting(SETTING, []) or []]


def add(journal, url: str, endpoint_url: str | None) -> bool:
    """Register url (replacing its endpoint if already there).  -> it was new."""
    with journal.reader() as r:
        mirrors = [m for m in configured(r) if m["url"] != url]
        new = len(mirrors) == len(configured(r))
    mirrors.append({"url": url, "endpoint_url": endpoint_url})
    journal.set_setting(SETTING, mirrors)
    return new


def remove(journal, url: str) -> bool:
    """Unregister url.  -> it was registered."""
    with journal.reader() as r:
        before = configured(r)
    after = [m for m in before if m["url"] != url]
    if len(after) != len(before):
        journal.set_setting(SETTING, after)
    return len(after) != len(before)
