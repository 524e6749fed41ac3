"""Graph/tree mode settings: set now, for a block, per call, and from the environment."""

import subprocess
import sys

import spmdnnx as nnx
from spmdnnx import _modes


def test_defaults_are_graph_mode_with_updates():
  assert nnx.set_graph_mode.current_value() is True
  assert nnx.set_graph_updates.current_value() is True


def test_context_restores_previous_value():
  with nnx.set_graph_mode(False):
    assert nnx.set_graph_mode.current_value() is False
    with nnx.set_graph_mode(True):
      assert nnx.set_graph_mode.current_value() is True
    assert nnx.set_graph_mode.current_value() is False
  assert nnx.set_graph_mode.current_value() is True


def test_plain_call_sets_until_changed():
  nnx.set_graph_updates(False)
  try:
    assert nnx.set_graph_updates.current_value() is False
    assert _modes.resolve_graph_updates(None) is False
    assert _modes.resolve_graph_updates(True) is True
  finally:
    nnx.set_graph_updates(True)
  assert nnx.set_graph_updates.current_value() is True


def test_decorator_applies_per_call_only():
  @nnx.set_graph_mode(False)
  def inside():
    return nnx.set_graph_mode.current_value()

  assert nnx.set_graph_mode.current_value() is True
  assert inside() is False
  assert nnx.set_graph_mode.current_value() is True


def test_environment_sets_the_default():
  code = "import spmdnnx as nnx; print(nnx.set_graph_mode.current_value(), nnx.set_graph_updates.current_value())"
  out = subprocess.run(
      [sys.executable, "-c", code], capture_output=True, text=True, check=True,
      env={"NNX_GRAPH_MODE": "0", "NNX_GRAPH_UPDATES": "false", "JAX_PLATFORMS": "cpu",
           "PATH": "/usr/bin:/bin"})
  assert out.stdout.split() == ["False", "False"]
