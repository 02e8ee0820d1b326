"""History tools over a journal reader: log, cat, diff, restore (no mount needed).

Everything here takes a :class:`deltafs.journal.Reader` (or a Journal and
opens its own short readers) and a path relative to SRC (bytes, ``b""`` is
the root).  Nothing here prints: functions return data or strings, and
``cli`` prints them.

Path semantics:

* ``log PATH`` of a file lists every record whose path (or rename/link
  target) is PATH, plus every record of the file currently at PATH (so a
  file renamed into place shows its earlier versions); of a directory,
  every record at or below it; of the root, every record.
* ``cat``/``diff``/``restore`` resolve PATH in the tree *as it was* at the
  chosen moment (``Reader.tree_at``), so deleted and renamed-away paths
  work.
"""

from __future__ import annotations

from deltafs.history.format import (LOG_HEADER, ProgressLine, diff_file_text, diff_tree_line,
                                    human_size, iso_time, log_line, record_entry, show_path)
from deltafs.history.query import (Thinned, cat_source, entry_at, is_pruned, missing_error,
                                   outcome_code, path_seen, path_seqs, pruned_error, pruned_seqs,
                                   reading, resolve_point, retained_entry, root_entry, thinned_note)
from deltafs.history.log import (SAVE_GAP_NS, deleted_entries, follow_batches, follow_entries,
                                 group_saves, log_entries, save_entries, save_entry)
from deltafs.history.diff import (COMPARE_WINDOW, TEXT_DIFF_MAX, Side, diff_file, diff_tree,
                                  entry_changes, same_content)
from deltafs.history.restore import (ROLLBACK_PREFIX, TMP_PREFIX, Progress, Refused, RestoreReport,
                                     restore, restore_exit_code, rollback, rollback_plan,
                                     snapshot_name, write_content)

__all__ = [
    "COMPARE_WINDOW", "LOG_HEADER", "Progress", "ProgressLine", "ROLLBACK_PREFIX", "Refused",
    "RestoreReport", "SAVE_GAP_NS", "Side", "TEXT_DIFF_MAX", "TMP_PREFIX", "Thinned", "cat_source",
    "deleted_entries", "diff_file", "diff_file_text", "diff_tree", "diff_tree_line", "entry_at",
    "entry_changes", "follow_batches", "follow_entries", "group_saves", "human_size", "is_pruned",
    "iso_time", "log_entries", "log_line", "missing_error", "outcome_code", "path_seen",
    "path_seqs", "pruned_error", "pruned_seqs", "reading", "record_entry", "resolve_point",
    "restore", "restore_exit_code", "retained_entry", "rollback", "rollback_plan", "root_entry",
    "same_content", "save_entries", "save_entry", "show_path", "snapshot_name", "thinned_note",
    "write_content",
]
