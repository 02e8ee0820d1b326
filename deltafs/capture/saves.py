"""What a rename means for history: the editor-save rules (docs/design.md, "File identity").

A rename is classified from what the capture sees of it (the renamed
entry's stat after the rename, whether either name is ignored, what it
replaced, whether the target path just lost its file), and the Recorder
records each kind its own way.  This module only decides; it does no I/O.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from typing import Callable

RENAME_EXCHANGE = 2  # renameat2 flag

# the kinds of rename
IGNORED = "ignored"  # both names ignored: nothing to record
EXCHANGE = "exchange"  # RENAME_EXCHANGE: the two entries swap
HIDDEN = "hidden"  # renamed to an ignored name (todo.md -> todo.md~): gone from the visible tree
SAVE = "save"  # an atomic save: the renamed file's content is the next version of the target path
APPEARS = "appears"  # from an ignored name, not a save: the entry (a directory, a symlink...) appears
RENAME = "rename"  # a plain rename: the entry keeps its identity under the new name


@dataclass(frozen=True)
class Rename:
    kind: str
    # SAVE: the replaced file was the target's file (its only name), so the new
    # content continues its history and its xattr names are removed if absent
    over_is_save_target: bool = False
    # SAVE: the rename replaced a file that lives on under another name (a hard
    # link): unlink the target path first, the old file keeps its identity there
    replaced_lives_on: bool = False


def classify_rename(st: os.stat_result, ign_old: bool, ign_new: bool, flags: int, replaced,
                    over: os.stat_result | None, was_gone: Callable[[], bool]) -> Rename:
    """File identity (docs/design.md): a file renamed to a live name keeps
    its identity; renamed over a regular file whose last name that was, or
    onto the path of a file just gone, it is that file's next version (an
    atomic save); renamed to an ignored name it is gone.  A replaced file
    that keeps another name keeps its identity there.

    ``st``: the renamed entry, after the rename; ``replaced``: whether the
    rename replaced an entry (ops' knowledge when ``over`` is None);
    ``over``: the stat of what it replaced, as it was before; ``was_gone()``:
    did the target path lose its file within the reuse window (asked only
    when it matters, it forgets the path)."""
    if ign_old and ign_new:
        return Rename(IGNORED)
    if flags & RENAME_EXCHANGE:
        return Rename(EXCHANGE)
    if not ign_old and ign_new:
        return Rename(HIDDEN)
    if over is not None:  # what the rename replaced, as it was before
        replaced = True
        over_is_save_target = stat.S_ISREG(over.st_mode) and over.st_nlink <= 1
    else:
        over_is_save_target = replaced = bool(replaced)
    if stat.S_ISREG(st.st_mode) and (ign_old or st.st_nlink <= 1) and (
            ign_old or over_is_save_target or (not replaced and was_gone())):
        # an atomic save: the new content is the next version of the target
        # (or, renamed from an ignored name onto a free path, a new file
        # there, continuing a gone file's history: the journal decides)
        return Rename(SAVE, over_is_save_target, replaced and not over_is_save_target)
    return Rename(APPEARS if ign_old else RENAME)
