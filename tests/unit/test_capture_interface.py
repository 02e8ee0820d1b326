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
from deltafs.capture.state import EOF_RANGE_END, MAX_RANGES, NodeCapture
from deltafs.ops import UNTRACKED, Capture, CaptureState, Node, NullRecorder

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


# --- a node's capture state belongs to capture ---------------------------------------------------
STATE_METHODS = sorted(n for n, v in vars(CaptureState).items() if not n.startswith("_") and callable(v))


def test_ops_nodes_hold_no_capture_state_of_their_own():
    """ops.Node carries pass-through state only, plus one ``cap`` (capture's)."""
    assert "cap" in Node.__slots__
    assert not {"dirty", "pending", "size_changed", "base", "last_item"} & set(Node.__slots__)


@pytest.mark.parametrize("name", STATE_METHODS)
def test_the_node_capture_implements_the_state_protocol(name):
    want = list(inspect.signature(getattr(CaptureState, name)).parameters)
    assert list(inspect.signature(getattr(NodeCapture, name)).parameters) == want


def test_ops_uses_only_the_state_protocol():
    """What ops reads or calls on a ``.cap`` is CaptureState's (and setting it is the recorder's)."""
    tree = ast.parse(OPS.read_text())
    used = {n.attr for n in ast.walk(tree)
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Attribute) and n.value.attr == "cap"}
    used |= {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)
             and isinstance(n.value, ast.Name) and n.value.id == "cap"}
    assert used and used <= set(STATE_METHODS) | {"pending", "changed"}, used


def test_a_node_is_tracked_only_when_it_may_change(tmp_path):
    """Looked-up nodes share a read-only placeholder (nothing dirty, nothing
    pending; a change to it fails loudly); the Recorder gives a node its own
    state, the NullRecorder (--no-capture) one that notes nothing."""
    node = Node(5, None, None, b"x")
    assert node.cap is UNTRACKED and not node.cap.changed and node.cap.pending is None
    with pytest.raises(AttributeError):
        node.cap.mark(0, 1)
    rec = Recorder.__new__(Recorder)  # track() uses no recorder state
    cap = rec.track(node)
    assert node.cap is cap and isinstance(cap, NodeCapture) and rec.track(node) is cap
    cap.mark(0, 10)
    cap.mark(5, 20)
    cap.mark(100, 110)
    assert cap.changed and cap.take() == [(0, 20), (100, 110)] and not cap.changed
    cap.resized(50, 10)
    assert cap.size_changed and cap.dirty == [[10, EOF_RANGE_END]]
    other = Node(6, None, None, b"y")
    NullRecorder().track(other)
    other.cap.mark(0, 1)
    other.cap.truncated()
    assert not other.cap.changed


def test_dirty_ranges_stay_bounded_under_random_writes():
    cap = NodeCapture()
    for i in range(3 * MAX_RANGES):
        cap.mark(i * 1000 * 7919 % (1 << 30), i * 1000 * 7919 % (1 << 30) + 10)
    assert len(cap.dirty) <= MAX_RANGES
    assert all(any(s <= i * 1000 * 7919 % (1 << 30) and i * 1000 * 7919 % (1 << 30) + 10 <= e
                   for s, e in cap.dirty) for i in range(0, 3 * MAX_RANGES, 97))
