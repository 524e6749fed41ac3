"""Rebuilding a graph whose structure changed, keeping existing objects.

When a transform's function adds sub-modules or Variables to the objects it
was given (vmap over ``__init__``, ``sow`` inside ``jit``), the new structure
is rebuilt around the original objects so that every reference the caller
holds stays valid.
"""

from __future__ import annotations

from typing import Any

from spmdnnx._graph import Builder, GraphDef, raw, variable_from
from spmdnnx._graphdef import NodeSpec, VariableSpec
from spmdnnx._object import Object
from spmdnnx._typing import PathParts
from spmdnnx._variables import Variable, bump_epoch, thaw, write_back


def rebuild_into(graphdef: GraphDef, leaves: list, reuse: dict[int, Any]) -> Any:
  """Rebuilds a graph whose structure changed, reusing existing objects.

  `leaves` are the state leaves in the new graph's DFS order; `reuse` maps
  node indices of the new GraphDef to live objects that must keep their
  identity (their attributes / items / values are replaced in place). Nodes
  not in `reuse` are created. This is how a transform that adds sub-modules
  or Variables inside (e.g. vmap over ``__init__``) updates the originals.
  """
  it = iter(leaves)

  def take(path, spec):
    leaf = next(it)
    if type(spec) is not VariableSpec:
      return raw(leaf)
    target = reuse.get(spec.index)
    if target is None:
      return variable_from(spec, leaf)
    write_back(target, leaf)
    if not isinstance(leaf, Variable) and spec.metadata != target.frozen_metadata():
      target.set_metadata(**{k: thaw(v) for k, v in spec.metadata})
    return target

  builder = _ReusingBuilder(take, reuse)
  return builder.build(graphdef.spec, ())


class _ReusingBuilder(Builder):
  """A Builder that fills existing objects in place where told to."""

  __slots__ = ("reuse",)

  def __init__(self, take, reuse):
    super().__init__(take)
    self.reuse = reuse

  def build(self, spec: tuple, path: PathParts) -> Any:
    if type(spec) is not NodeSpec or spec.index not in self.reuse:
      return super().build(spec, path)
    idx, attrs = spec.index, spec.children
    obj = self.reuse[idx]
    self.nodes[idx] = obj
    children = [(k, self.build(sub, path + (k,))) for k, sub in attrs]
    if isinstance(obj, Object):
      d = obj.__dict__
      d.clear()
      d.update(children)
      if obj._object__watched:
        bump_epoch()
    elif isinstance(obj, list):
      obj[:] = [v for _, v in children]
    elif isinstance(obj, dict):
      obj.clear()
      obj.update(children)
    return obj
