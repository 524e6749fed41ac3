"""Split/merge contexts: several splits sharing one walk, updates across a boundary.

These are the building blocks of a hand-written lifted transform (Flax NNX's
``split_context`` / ``merge_context`` / ``update_context``):

- ``with split_context(tag) as ctx``: each ``ctx.split(x)`` continues one
  walk, so an object split twice comes back as a reference to the first;
- ``with merge_context(tag, inner) as ctx``: each ``ctx.merge(gd, state)``
  continues one build, so those references resolve to the same objects;
- ``with update_context(tag)``: ties an outer split, an inner merge and
  split (e.g. inside ``jax.jit``) and an outer merge together: the outer
  merge (``inner=False``) updates the *original* objects in place, keeping
  their identity, with the inner side's values and structure.

>>> import jax, spmdnnx as nnx
>>> m = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
>>> with nnx.update_context("demo"):
...   with nnx.split_context("demo") as ctx:
...     gd, state = ctx.split(m)
...   @jax.jit
...   def f(gd, state):
...     with nnx.merge_context("demo", True) as ctx:
...       inner = ctx.merge(gd, state)
...     inner.kernel.value = inner.kernel.value * 0
...     with nnx.split_context("demo") as ctx:
...       return ctx.split(inner)
...   gd, state = f(gd, state)
...   with nnx.merge_context("demo", False) as ctx:
...     out = ctx.merge(gd, state)
>>> out is m, float(m.kernel.value.sum())
(True, 0.0)
"""

from __future__ import annotations

import contextlib
import functools
import threading
from typing import Any, Hashable

from spmdnnx import errors
from spmdnnx._graph import Builder, GraphDef, Walk, raw
from spmdnnx._graphdef import RefSpec, VariableSpec
from spmdnnx._restructure import _ReusingBuilder
from spmdnnx._state import State, split_pairs
from spmdnnx._variables import Variable, detach, new_variable, thaw, write_back


class UpdateContext:
  """What an update context remembers between its outer and inner halves.

  Attributes:
    tag: the context's tag.
    outer_nodes: node index -> original object, from the outer split.
    inner_index: ``id(inner object)`` -> outer index, from the inner merge.
  """

  def __init__(self, tag: Hashable):
    self.tag = tag
    self.outer_nodes: dict[int, Any] | None = None
    self.inner_index: dict[int, int] | None = None
    self._keep: list = []  # inner objects stay alive while their ids are keys


class _Stacks(threading.local):

  def __init__(self):
    self.by_tag: dict = {}


_STACKS = _Stacks()


class update_context:  # noqa: N801 (Flax's name)
  """Opens an update context for `tag` (a context manager or a decorator)."""

  def __init__(self, tag: Hashable):
    self.tag = tag

  def __enter__(self) -> UpdateContext:
    ctx = UpdateContext(self.tag)
    _STACKS.by_tag.setdefault(self.tag, []).append(ctx)
    return ctx

  def __exit__(self, *exc):
    stack = _STACKS.by_tag[self.tag]
    stack.pop()
    if not stack:
      del _STACKS.by_tag[self.tag]
    return False

  def __call__(self, f):

    @functools.wraps(f)
    def wrapper(*args, **kwargs):
      with update_context(self.tag):
        return f(*args, **kwargs)

    return wrapper


def current_update_context(tag: Hashable) -> UpdateContext:
  """The innermost update context of `tag`.

  Raises:
    GraphError: no update context of that tag is open.
  """
  stack = _STACKS.by_tag.get(tag)
  if not stack:
    raise errors.GraphError(
        f"No update context for tag {tag!r} is open; wrap the code in "
        f"`with nnx.update_context({tag!r}):`.")
  return stack[-1]


def _find(tag: Hashable | None) -> UpdateContext | None:
  if tag is None:
    return None
  stack = _STACKS.by_tag.get(tag)
  return stack[-1] if stack else None


class SplitContext:
  """Splits that share one walk (see `split_context`)."""

  def __init__(self, tag: Hashable | None):
    self._tag = tag
    self._walk = Walk(detach=False)

  def split(self, node: Any, *filters) -> tuple:
    """Like `nnx.split`; an object already split in this context becomes a reference."""
    walk = self._walk
    start = len(walk.pairs)
    spec = walk.visit(node, ())
    pairs = walk.pairs[start:]
    outer = None
    upd = _find(self._tag)
    if upd is not None and upd.inner_index is not None:
      outer = tuple((i, upd.inner_index[id(n)]) for i, n in enumerate(walk.nodes)
                    if id(n) in upd.inner_index)
    graphdef = GraphDef(spec, outer)
    if not filters:
      return graphdef, State.from_flat_path(pairs)
    return (graphdef, *(State.from_flat_path(p)
                        for p in split_pairs(pairs, filters, exhaustive=True)))

  def _close(self) -> None:
    upd = _find(self._tag)
    if upd is not None and upd.inner_index is None:
      upd.outer_nodes = dict(enumerate(self._walk.nodes))


@contextlib.contextmanager
def split_context(tag: Hashable | None = None):
  """A `SplitContext`; with a tag inside `update_context`, the split is remembered."""
  ctx = SplitContext(tag)
  yield ctx
  ctx._close()


class MergeContext:
  """Merges that share one build (see `merge_context`)."""

  def __init__(self, tag: Hashable | None, inner: bool | None):
    self._tag = tag
    self._inner = inner
    self._builder: Builder | None = None

  def merge(self, graphdef: GraphDef, state: Any = None, /, *states: Any) -> Any:
    """Like `nnx.merge`; references to objects merged earlier resolve to them."""
    leaves: dict = {}
    for s in (state, *states):
      if s is not None:
        leaves.update((s if isinstance(s, State) else State(s)).flat_state())
    spec = graphdef.spec
    upd = _find(self._tag)
    reuse: dict = {}
    if self._inner is False and upd is not None and upd.outer_nodes is not None:
      for i, o in graphdef.outer or ():
        if o in upd.outer_nodes:
          reuse[i] = upd.outer_nodes[o]
    if self._builder is None:
      self._builder = _ReusingBuilder(None, reuse) if reuse else Builder(None)
    builder = self._builder
    if reuse and isinstance(builder, _ReusingBuilder):
      builder.reuse.update(reuse)

    def take(path, vspec):
      if path not in leaves:
        raise errors.GraphError(
            f"merge_context: the State misses {errors.path_str(path)}; pass the "
            "State(s) from the matching ctx.split.", paths=[path])
      leaf = leaves.pop(path)
      if type(vspec) is not VariableSpec:
        return raw(leaf)
      target = reuse.get(vspec.index)
      if isinstance(target, Variable):
        write_back(target, leaf)
        if not isinstance(leaf, Variable) and vspec.metadata != target.frozen_metadata():
          target.set_metadata(**{k: thaw(v) for k, v in vspec.metadata})
        return target
      if isinstance(leaf, Variable):
        return detach(leaf) if self._inner is False else leaf
      return new_variable(vspec.type, leaf, frozen=vspec.metadata)

    builder.take = take
    if type(spec) is RefSpec:
      return builder.nodes[spec.index]
    return builder.build(spec, ())

  def _close(self) -> None:
    upd = _find(self._tag)
    if upd is not None and self._inner and self._builder is not None:
      nodes = self._builder.nodes
      upd.inner_index = {id(n): i for i, n in nodes.items()}
      upd._keep = list(nodes.values())


@contextlib.contextmanager
def merge_context(tag: Hashable | None = None, inner: bool | None = None):
  """A `MergeContext`: ``inner=True`` inside the boundary, ``False`` for the outer merge."""
  ctx = MergeContext(tag, inner)
  yield ctx
  ctx._close()
