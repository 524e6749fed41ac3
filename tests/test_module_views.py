"""nnx.view / view_info / with_attributes / compat: copies in another mode, inputs untouched."""

import jax.numpy as jnp
import numpy as np
import pytest

import spmdnnx as nnx
from spmdnnx import errors


class Drop(nnx.Module):

  def __init__(self):
    self.deterministic = False
    self.w = nnx.Param(jnp.ones(2))

  def set_view(self, deterministic: bool | None = None):
    """Sets the mode.

    Args:
      deterministic: if True, no dropout.
    """
    if deterministic is not None:
      self.deterministic = deterministic


class Norm(nnx.Module):

  def __init__(self):
    self.use_running_average = False

  def set_view(self, use_running_average=None, **unused):
    if use_running_average is not None:
      self.use_running_average = use_running_average


class Net(nnx.Module):

  def __init__(self):
    self.drop = Drop()
    self.norm = Norm()


@pytest.mark.parametrize("graph", [True, False])
def test_view_sets_modes_on_a_copy(graph):
  net = Net()
  out = nnx.view(net, deterministic=True, use_running_average=True, graph=graph)
  assert out.drop.deterministic and out.norm.use_running_average
  assert not net.drop.deterministic and not net.norm.use_running_average
  assert out.drop.w is net.drop.w  # Variables shared
  only = nnx.view(net, only=Drop, deterministic=True, graph=graph)
  assert only.drop.deterministic and not only.norm.use_running_average


def test_view_unknown_option_errors():
  with pytest.raises(errors.GraphError, match=r"Unused keys found in nnx.view: \['bogus'\]"):
    nnx.view(Drop(), bogus=1)
  assert nnx.view(Drop(), bogus=1, raise_if_not_found=False).deterministic is False


def test_view_info_lists_options_with_docs():
  text = nnx.view_info(Net())
  assert text.splitlines()[:3] == [
      "Drop:", "  deterministic: bool | None = None", "    if True, no dropout."]
  assert "Norm:" in text and "  use_running_average = None" in text


@pytest.mark.parametrize("graph", [True, False])
def test_with_attributes_copies_and_checks_names(graph):
  net = Net()
  out = nnx.with_attributes(net, deterministic=True, graph=graph)
  assert out.drop.deterministic and not net.drop.deterministic
  with pytest.raises(errors.GraphError, match=r"following attributes: \['unknown'\]"):
    nnx.with_attributes(net, unknown=1, graph=graph)
  nnx.with_attributes(net, unknown=1, raise_if_not_found=False, graph=graph)


def test_compat_defaults_to_graph_mode():
  p = nnx.Param(jnp.ones(1))
  with nnx.set_graph_mode(False):
    with pytest.raises(errors.GraphError, match="found at paths 0 and 1"):
      nnx.split([p, p])
    gd, state = nnx.compat.split([p, p])
    out = nnx.merge(gd, state)
    assert out[0] is out[1]
    assert len(list(nnx.compat.iter_graph([p, p]))) == 2  # p once, then the list


class Block(nnx.Module):

  def __init__(self, rngs):
    self.linear = nnx.Linear(2, 4, rngs=rngs)
    self.bn = nnx.BatchNorm(4, rngs=rngs)
    self.dropout = nnx.Dropout(0.5, rngs=rngs)


def test_builtin_layers_have_set_view_options():
  info = nnx.view_info(Block(nnx.Rngs(0)))
  assert info.count("BatchNorm:") == 1 and info.count("Dropout:") == 1
  assert "use_running_average: bool | None = None" in info
  assert "Linear:" not in info  # no set_view, no block
  only = nnx.view_info(Block(nnx.Rngs(0)), only=nnx.Dropout)
  assert "Dropout:" in only and "BatchNorm:" not in only
  assert nnx.view_info(Block(nnx.Rngs(0)), only=nnx.MultiHeadAttention) == ""


def test_view_through_builtin_set_view_changes_only_the_copy():
  m = Block(nnx.Rngs(0))
  v = nnx.view(m, deterministic=True, use_running_average=True)
  assert v.dropout.deterministic and v.bn.use_running_average
  assert not m.dropout.deterministic and not m.bn.use_running_average
  x = jnp.ones((3, 4))
  np.testing.assert_array_equal(v.dropout(x), x)  # identity in the view
  v2 = nnx.view(v, deterministic=None)  # None keeps the mode
  assert v2.dropout.deterministic
