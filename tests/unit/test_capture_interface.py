"""ops <-> capture: one typed interface (ops.Capture), kept true.

ops never imports capture; the Recorder is handed in.  What ops may call is
the Capture protocol's methods, by name (no hook chosen by a string), and
both the Recorder and the NullRecorder (--no-capture) provide each one with
the protocol's parameters."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

from deltafs.capture import Recorder
from deltafs.ops import Capture, NullRecorder

OPS = Path(__file__).resolve().parents[2] / "deltafs" / "ops.py"
METHODS = sorted(n for n, v in vars(Capture).items() if not n.startswith("_") and callable(v))


def test_the_protocol_names_every_hook():
    assert "on_rename" in METHODS and "before_change" in METHODS and "fsync" in METHODS


@pytest.mark.parametrize("name", METHODS)
def test_the_recorder_implements_the_protocol(name):
    want = list(inspect.signature(getattr(Capture, name)).parameters)
    assert list(inspect.signature(getattr(Recorder, name)).parameters) == want
    assert callable(getattr(NullRecorder, name))


def test_ops_calls_capture_only_through_the_protocol():
    tree = ast.parse(OPS.read_text())
    used = {n.attr for n in ast.walk(tree)
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Attribute)
            and n.value.attr == "rec" and isinstance(n.value.value, ast.Name) and n.value.value.id == "self"}
    assert used and used <= set(METHODS) | {"enabled"}, used - set(METHODS)
