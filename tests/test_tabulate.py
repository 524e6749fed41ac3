"""tabulate: rows per call, shapes, Variable counts/bytes, nothing computed."""

import jax
import jax.numpy as jnp
import pytest

import spmdnnx as nnx
from spmdnnx import errors


class Block(nnx.Module):

  def __init__(self, rngs):
    self.lin = nnx.Linear(4, 4, rngs=rngs)
    self.bn = nnx.BatchNorm(4, rngs=rngs)

  def __call__(self, x):
    return self.bn(self.lin(x), use_running_average=True)

  def encode(self, x):
    return self.lin(x)


class Net(nnx.Module):

  def __init__(self, rngs):
    self.blocks = nnx.List([Block(rngs), Block(rngs)])
    self.head = nnx.Linear(4, 1, use_bias=False, rngs=rngs)

  def __call__(self, x):
    for b in self.blocks:
      x = b(x)
    return self.head(x)


def _rows(table):
  lines = table.splitlines()
  return [l.split() for l in lines[2:-2]], lines[-1].split()


def test_rows_in_call_order_with_shapes_and_counts():
  net = Net(nnx.Rngs(0))
  table = nnx.tabulate(net, jnp.ones((2, 4)))
  header = table.splitlines()[0].split()
  assert header[:4] == ["path", "module", "inputs", "outputs"]
  assert set(header[4:]) == {"Param", "BatchStat"}
  rows, total = _rows(table)
  paths = [r[0] if r[0] != "Net" else "" for r in rows]
  assert paths == ["", "blocks/0", "blocks/0/lin", "blocks/0/bn", "blocks/1", "blocks/1/lin",
                   "blocks/1/bn", "head"]
  lin_row = next(r for r in rows if r[0] == "blocks/0/lin")
  assert lin_row[1:4] == ["Linear", "float32[2,4]", "float32[2,4]"]
  assert lin_row[4:6] == ["20", "(80"]
  # 2 x (20 + 8 scale/bias) + 4 head Params; 2 x 8 BatchStats.
  assert "60" in total and "16" in total


def test_depth_and_method():
  net = Net(nnx.Rngs(0))
  rows, _ = _rows(nnx.tabulate(net, jnp.ones((2, 4)), depth=1))
  assert all("/" not in r[0] for r in rows)
  block = Block(nnx.Rngs(0))
  rows, _ = _rows(nnx.tabulate(block, jnp.ones((3, 4)), method="encode"))
  assert rows[0][:1] == ["Block"] and rows[1][0] == "lin"


def test_nothing_is_computed_or_changed():
  net = Net(nnx.Rngs(0))
  before = jax.tree.map(lambda x: x, nnx.state(net))
  nnx.tabulate(net, jax.ShapeDtypeStruct((8, 4), jnp.float32))
  after = nnx.state(net)
  assert all(jnp.array_equal(a.value, b.value)
             for (_, a), (_, b) in zip(before.flat_state(), after.flat_state()))
  assert "__wrapped__" not in vars(Block.__call__)


def test_bad_arguments():
  with pytest.raises(errors.ArgumentError, match="expected a Module, got int"):
    nnx.tabulate(3)
  with pytest.raises(errors.ArgumentError, match="has no method 'decode'"):
    nnx.tabulate(Block(nnx.Rngs(0)), jnp.ones((1, 4)), method="decode")
