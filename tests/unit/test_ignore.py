"""The ignore memo (issue 18, part 4): bounded, and without a cliff: a
path in use keeps its answer however many other paths go through."""

from __future__ import annotations

from collections import Counter

from deltafs import ignore as I


class Counted:
    """Wraps a pathspec and counts the paths it is asked about."""

    def __init__(self, spec) -> None:
        self.spec = spec
        self.asked: Counter[str] = Counter()

    def match_file(self, p: str) -> bool:
        self.asked[p] += 1
        return self.spec.match_file(p)


def test_a_path_in_use_is_never_asked_again_and_the_memo_stays_bounded(tmp_path):
    ig = I.Ignore(str(tmp_path))
    ig.spec = counted = Counted(ig.spec)
    ig._any = None  # every miss asks the spec (the pre-filter is tested below)
    hot = [b"d/notes.txt", b"d/.notes.txt.swp", b"d/x.tmp"]
    n = 150_000  # over twice any bound: the old memo (cleared at 65,536) missed the hot paths each time
    for i in range(n):
        assert ig.match(b"cold/f%07d.txt" % i) is False
        if i % 100 == 0:
            assert [ig.match(h) for h in hot] == [False, True, True]
    assert ig.match(b"d", is_dir=True) is False
    for h in hot:
        assert counted.asked[h.decode()] == 1, (h, counted.asked[h.decode()])
    # bounded: the cold paths went through once each and most of them are forgotten
    assert ig.memo_size() <= 2 * I.MEMO_GENERATION
    assert counted.asked["cold/f0000000.txt"] == 1
    assert ig.match(b"cold/f0000000.txt") is False  # long gone from the memo: asked again
    assert counted.asked["cold/f0000000.txt"] == 2


def test_answers_are_the_specs(tmp_path):
    (tmp_path / I.IGNORE_FILE).write_text("build/\n*.log\n!keep.log\n")
    ig = I.Ignore(str(tmp_path))
    for _ in range(2):  # from the spec, then from the memo
        assert ig.match(b"a.log") and not ig.match(b"keep.log")
        assert ig.match(b"build", is_dir=True) and not ig.match(b"build")
        assert ig.match(None) and not ig.match(b"")


PATTERN_SETS = [
    "",
    "build/\n*.log\n!keep.log\n",
    "/top.txt\ndocs/**/*.pdf\n**/cache/\n!**/cache/keep\n[abc]?.dat\n[!x]y.bin\nsub/dir/\n",
    "*\n!*.py\n!*/\n",  # ignore everything but Python files (negations decide)
    "\\#*#\nfoo bar\n\\!bang\n*.o\n**/node_modules\n",
]
PATHS = ["a.log", "keep.log", "d/keep.log", "build", "src/build", "top.txt", "x/top.txt", "docs/a/b/c.pdf",
         "docs/c.pdf", "a/cache", "a/cache/keep", "a/cache/f", "ab.dat", "a.dat", "xy.bin", "zy.bin", "sub/dir",
         "sub/dir/f", "m.py", "m/n.py", "m/n.txt", "#x#", "d/#x#", "foo bar", "!bang", "k.o", "q/node_modules",
         "q/node_modules/z.js", ".git/objects/ab/cdef0123", "notes.txt.swp", "d/.n.swp", "4913", "f~", ".#l",
         "x.tmp", "a.db-journal", "plain", "d/e/f/g.c", "a/b/.~lock.x#"]


def test_the_prefilter_answers_as_the_spec_and_asks_it_only_for_matches(tmp_path):
    for patterns in PATTERN_SETS:
        (tmp_path / I.IGNORE_FILE).write_text(patterns)
        ig = I.Ignore(str(tmp_path))
        assert ig._any is not None, patterns
        ig.spec = counted = Counted(ig.spec)
        for p in PATHS:
            for is_dir in (False, True):
                q = p + "/" if is_dir else p
                assert ig.match(p.encode(), is_dir) == counted.spec.match_file(q), (patterns, q)
        # a path no pattern matches never reaches pathspec
        assert all(counted.spec.match_file(p) or n == 1 for p, n in counted.asked.items())
        asked_plain = counted.asked["plain"]
        assert asked_plain == (1 if counted.spec.match_file("plain") else 0), patterns
