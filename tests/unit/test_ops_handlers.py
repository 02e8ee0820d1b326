"""No exception can end pyfuse3's main loop (STYLE.md, "Errors").

pyfuse3 catches FUSEError only: anything else raised by a request handler
ends its main loop and leaves a hung mount.  So every async handler of
ops.Operations is wrapped: ``_errors`` (OSError -> its errno, anything
else logged and EIO) or, for requests that get no reply (forget),
``_no_reply`` (anything logged and dropped).
"""

from __future__ import annotations

import ast
import inspect
import logging
import os
from pathlib import Path

import pyfuse3

from deltafs import ops

# Handlers that guard themselves, and why.
SELF_GUARDED = {
    # the security.capability probe before every write(2) is answered inline
    # (a hot path: one getxattr, FUSEError only); everything else goes
    # through _getxattr, which is wrapped by _errors
    "getxattr",
}


def test_every_async_handler_is_wrapped():
    tree = ast.parse(Path(ops.__file__).read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Operations")
    handlers = {name for name in dir(pyfuse3.Operations)
                if inspect.iscoroutinefunction(getattr(pyfuse3.Operations, name))}
    defined = {n.name: n for n in cls.body if isinstance(n, ast.AsyncFunctionDef) and n.name in handlers}
    assert len(defined) > 20  # the check looks at the real class
    bare = sorted(name for name, fn in defined.items()
                  if not {ast.unparse(d) for d in fn.decorator_list} & {"_errors", "_no_reply"})
    assert bare == sorted(SELF_GUARDED), "async handlers an exception could escape from"


async def test_an_error_in_forget_is_logged_not_raised(tmp_path, caplog):
    """A bug in forget cannot be caused on purpose, so the node table is made
    to fail (the one stand-in in this test): forget must log it and return."""

    class Broken(dict):
        def get(self, key, default=None):
            raise RuntimeError("node table broke")

    o = ops.Operations(str(tmp_path))
    try:
        o.nodes = Broken(o.nodes)
        with caplog.at_level(logging.ERROR, logger="deltafs.ops"):
            assert await o.forget([(12345, 1)]) is None
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1 and "forget" in errors[0].getMessage() and errors[0].exc_info
    finally:
        for node in dict.values(o.nodes):  # the root's descriptor
            if isinstance(getattr(node, "fd", None), int):
                os.close(node.fd)
