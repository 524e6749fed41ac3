"""Presets on many mesh shapes: a rule to size-1 mesh axes yields to the next rule.

A rule whose mesh axes multiply to 1 splits nothing, so it must not claim its
dimension: the name's next rule gets it. Every shipped preset is checked on
several mesh shapes against a small transformer-like model: no parameter may
end up effectively replicated when one of the rules for its logical names maps
a dimension onto a mesh axis (product > 1) that divides it.
"""

import math

import jax
import pytest
from jax.sharding import PartitionSpec as P

from spmdnnx import _graph as graph
from spmdnnx._module import Module
from spmdnnx._rngs import Rngs
from spmdnnx._variables import Param
from spmdnnx.nn._attention import MultiHeadAttention
from spmdnnx.nn._embed import Embed
from spmdnnx.nn._linear import Linear
from spmdnnx.nn._normalization import LayerNorm
from spmdnnx.spmd._mesh import AXES, MeshConfig
from spmdnnx.spmd._partition import get_partition_spec
from spmdnnx.spmd._rules import AxisRules
from spmdnnx.spmd import _mesh_axes as mesh_axes_lib

PRESETS = ("dp", "fsdp", "fsdp_tp", "fsdp_tp_sp")
MESHES = [dict(fsdp=8), dict(fsdp=4, tensor=2), dict(data=2, fsdp=2, tensor=2), dict(data=8),
          dict(tensor=8), dict(fsdp=2, sequence=2, tensor=2)]


class Block(Module):
  """Embedding, attention, MLP with biases, norm and output projection."""

  def __init__(self, rngs):
    self.embed = Embed(64, 16, rngs=rngs)
    self.norm = LayerNorm(16, rngs=rngs)
    self.attn = MultiHeadAttention(8, 16, qkv_features=64, rngs=rngs)
    self.up = Linear(16, 32, kernel_axes=("embed", "mlp"), rngs=rngs)
    self.down = Linear(32, 16, kernel_axes=("mlp", "embed"), rngs=rngs)
    self.head = Linear(16, 64, kernel_axes=("embed", "vocab"), rngs=rngs)


def _sizes(degrees):
  shape = MeshConfig(**degrees).mesh_shape(8)
  return {a: shape[a] for a in AXES}


def _splits(spec, sizes):
  return math.prod(sizes[a] for e in spec for a in mesh_axes_lib.entry_axes(e))


def _missed_splits(rules, leaf, spec, sizes):
  """Rules that could have split an effectively replicated parameter."""
  if leaf.logical_axes is None or _splits(spec, sizes) > 1:
    return []
  missed = []
  for dim, (name, size) in enumerate(zip(leaf.logical_axes, leaf.value.shape)):
    for axes in rules.lookup(name) if name is not None else ():
      ways = math.prod(sizes[a] for a in mesh_axes_lib.entry_axes(axes))
      if ways > 1 and size % ways == 0:
        missed.append((dim, name, axes, ways))
  return missed


@pytest.mark.parametrize("degrees", MESHES, ids=lambda d: "_".join(f"{k}{v}" for k, v in d.items()))
@pytest.mark.parametrize("preset", PRESETS)
def test_no_parameter_replicated_where_a_rule_could_split_it(preset, degrees):
  rules = AxisRules.load(preset)
  sizes = _sizes(degrees)
  abstract = jax.eval_shape(lambda: graph.state(Block(Rngs(0)), Param))
  specs = get_partition_spec(abstract, rules=rules, mesh=sizes)
  leaves = dict(abstract.flat_state())
  problems = {}
  for path, spec in specs.flat_state():
    missed = _missed_splits(rules, leaves[path], spec.value, sizes)
    if missed:
      problems["/".join(map(str, path))] = (spec.value, missed)
  assert not problems, problems


def test_fsdp_tp_on_an_fsdp_only_mesh_shards_mlp_biases_over_fsdp():
  rules = AxisRules.load("fsdp_tp")
  sizes = _sizes(dict(fsdp=8))
  assert rules.resolve(("mlp",), (32,), sizes) == P("fsdp")
  # kv has only a tensor rule (size 1 here): named in the spec, splitting nothing.
  assert rules.resolve(("heads", "kv"), (8, 8), sizes) == P("fsdp", "tensor")
  assert rules.resolve(("vocab",), (64,), sizes) == P("fsdp")
  # In the kernel embed takes fsdp first, so mlp keeps its (size-1) tensor entry.
  assert rules.resolve(("embed", "mlp"), (16, 32), sizes) == P("fsdp", "tensor")


def test_size_one_rule_is_kept_in_the_spec_when_nothing_else_takes_the_dim():
  rules = AxisRules([("mlp", "tensor"), ("embed", "fsdp")])
  sizes = {"fsdp": 4, "tensor": 1}
  assert rules.resolve(("embed", "mlp"), (8, 8), sizes) == P("fsdp", "tensor")
  # A later rule for the name wins over a size-1 rule, even one listed first.
  later = AxisRules([("mlp", "tensor"), ("mlp", "fsdp")])
  assert later.resolve(("mlp",), (8,), sizes) == P("fsdp")
  # ... but an explicit None rule settles the dimension as replicated.
  settled = AxisRules([("mlp", "tensor"), ("mlp", None), ("mlp", "fsdp")])
  assert settled.resolve(("mlp",), (8,), sizes) == P(None)


def test_size_one_axes_are_not_reused_in_one_spec():
  # ('batch' -> data) is size 1 and yields; 'embed' may not take 'data' twice.
  rules = AxisRules([("batch", "data"), ("embed", ("data", "fsdp")), ("embed", "fsdp")])
  spec = rules.resolve(("batch", "embed"), (8, 8), {"data": 1, "fsdp": 4})
  assert spec == P(None, ("data", "fsdp"))


def test_without_a_mesh_every_rule_applies():
  rules = AxisRules.load("fsdp_tp")
  assert rules.resolve_detailed(("mlp",), (3,), None).spec == P("tensor")
