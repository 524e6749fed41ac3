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
from typing import Any, Callable, Hashable

import jax

from spmdnnx import errors
from spmdnnx._graph import Builder, GraphDef, Walk, as_state, flatten, raw
from spmdnnx._object import Object
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
      return graphdef, as_state(pairs)
    return (graphdef, *(as_state(p) for p in split_pairs(pairs, filters, exhaustive=True)))

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
    spec = graphdef.spec
    for s in (state, *states):
      if s is None:
        continue
      if type(spec) is VariableSpec and not isinstance(s, (State, dict)):
        leaves[()] = s  # the node is a single Variable: its state is that Variable
      else:
        leaves.update((s if isinstance(s, State) else State(s)).flat_state())
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


# --------------------------------------------------------------------------------
# to_tree / from_tree: a pytree of graph nodes <-> a pytree of NodeStates
# --------------------------------------------------------------------------------


class NodeStates:
  """A split graph node as a pytree leaf group: its GraphDef and States.

  `to_tree` puts one in place of every graph node (Object, Variable) of a
  pytree; `from_tree` merges them back. As a prefix (``from_prefixes``) it
  gives one entry per State, e.g. a ``jax.vmap`` ``in_axes`` per filter.

  Attributes:
    states: the States (or, built with `from_prefixes`, one prefix each).
    metadata: any static value carried along (pytree aux data).

  >>> import spmdnnx as nnx
  >>> ns = nnx.NodeStates.from_split(*nnx.split(nnx.Linear(1, 1, rngs=nnx.Rngs(0))))
  >>> type(ns.graphdef).__name__, sorted(ns.state)
  ('GraphDef', ['bias', 'kernel'])
  """

  __slots__ = ("_graphdef", "states", "metadata")

  def __init__(self, _graphdef: GraphDef | None, states: tuple, metadata: Any = None):
    self._graphdef = _graphdef
    self.states = tuple(states)
    self.metadata = metadata

  @property
  def graphdef(self) -> GraphDef:
    """The GraphDef.

    Raises:
      GraphError: this NodeStates holds no GraphDef (built from states or prefixes).
    """
    if self._graphdef is None:
      raise errors.GraphError(
          "NodeStates: No graphdef available: this NodeStates was built from "
          "states or prefixes only; use NodeStates.from_split(graphdef, state).")
    return self._graphdef

  @property
  def state(self) -> Any:
    """The only State.

    Raises:
      GraphError: there is not exactly one State.
    """
    if len(self.states) != 1:
      raise errors.GraphError(
          f"NodeStates.state: expected exactly one State, got {len(self.states)}; "
          "read NodeStates.states instead.")
    return self.states[0]

  @classmethod
  def from_split(cls, graphdef: GraphDef | None, state: Any, /, *states: Any,
                 metadata: Any = None) -> "NodeStates":
    """From the result of ``split(node, *filters)``."""
    return cls(graphdef, (state, *states), metadata)

  @classmethod
  def from_states(cls, state: Any, *states: Any) -> "NodeStates":
    """From States alone (no GraphDef)."""
    return cls(None, (state, *states))

  @classmethod
  def from_prefixes(cls, prefixes, /, *, metadata: Any = None) -> "NodeStates":
    """A prefix for a NodeStates: one entry per State (e.g. vmap axes)."""
    return cls(None, tuple(prefixes), metadata)

  def replace(self, **changes: Any) -> "NodeStates":
    """A copy with the given fields (``_graphdef``, ``states``, ``metadata``) changed."""
    fields = {"_graphdef": self._graphdef, "states": self.states,
              "metadata": self.metadata}
    fields.update(changes)
    return NodeStates(**fields)

  def __repr__(self) -> str:
    return (f"NodeStates(graphdef={'None' if self._graphdef is None else '...'}, "
            f"states={self.states!r}, metadata={self.metadata!r})")


def _node_states_flatten(ns: NodeStates):
  return ((jax.tree_util.GetAttrKey("_graphdef"), ns._graphdef),
          (jax.tree_util.GetAttrKey("states"), ns.states)), ns.metadata


def _node_states_unflatten(metadata, children):
  graphdef, states = children
  return NodeStates(graphdef, states, metadata)


jax.tree_util.register_pytree_with_keys(
    NodeStates, _node_states_flatten, _node_states_unflatten)


def _is_node(x: Any) -> bool:
  return isinstance(x, (Object, Variable))


def _is_node_states(x: Any) -> bool:
  return isinstance(x, NodeStates)


def default_split_fn(ctx: SplitContext, path: tuple, prefix: Any, leaf: Any) -> NodeStates:
  """`to_tree`'s default: ``NodeStates.from_split(*ctx.split(leaf))``."""
  del path, prefix
  return NodeStates.from_split(*ctx.split(leaf))


def default_merge_fn(ctx: MergeContext, path: tuple, prefix: Any, leaf: Any) -> Any:
  """`from_tree`'s default: ``ctx.merge(leaf.graphdef, *leaf.states)``.

  Raises:
    GraphError: the leaf is not a NodeStates.
  """
  del prefix
  if not isinstance(leaf, NodeStates):
    raise errors.GraphError(
        f"from_tree: expected a NodeStates at {jax.tree_util.keystr(path)}, got "
        f"{type(leaf).__name__}; pass the tree to_tree returned.")
  return ctx.merge(leaf.graphdef, *leaf.states)


def _leaf_prefixes(prefix: Any, tree: Any, is_leaf: Callable) -> list:
  """`prefix` broadcast to one entry per leaf of `tree` (leaves per `is_leaf`)."""
  out: list = []

  def add(p, sub):
    n = jax.tree_util.tree_structure(sub, is_leaf=is_leaf).num_leaves
    out.extend([p] * n)

  jax.tree.map(add, prefix, tree, is_leaf=lambda x: x is None or is_leaf(x))
  return out


def _check_aliasing(seen: dict, keypath: tuple, node: Any, prefix: Any) -> None:
  """Records the prefix of each Variable in `node`; raises on a second, different one."""
  base = tuple(_key(k) for k in keypath)
  _, w = flatten(node, detach_variables=False)
  for (path, _), var in zip(w.pairs, w.variables):
    if var is None:
      continue
    entry = seen.setdefault(id(var), [var, []])
    entry[1].append((base + path, prefix))


def _raise_inconsistent(seen: dict, who: str) -> None:
  bad = []
  for var, uses in seen.values():
    first = uses[0][1]
    if any(not _same_prefix(p, first) for _, p in uses[1:]):
      lines = "\n".join(f"  {errors.path_str(path)}: {p!r}" for path, p in uses)
      bad.append((type(var).__name__, lines, [path for path, _ in uses]))
  if bad:
    text = "\n".join(f"Node: {name}\n{lines}" for name, lines, _ in bad)
    raise errors.GraphError(
        f"{who}: Inconsistent aliasing detected. The following nodes have different "
        f"prefixes:\n{text}\nA Variable reachable from several places must get the "
        "same prefix at each; make those prefixes equal.",
        paths=[p for _, _, paths in bad for p in paths])


def _same_prefix(a: Any, b: Any) -> bool:
  try:
    return bool(a is b or a == b)
  except Exception:  # noqa: BLE001  (arrays and other odd prefixes: compare by identity)
    return False


def _key(k: Any) -> Any:
  for attr in ("name", "key", "idx"):
    if hasattr(k, attr):
      return getattr(k, attr)
  return str(k)


_MISSING = object()


def to_tree(tree: Any, /, *, prefix: Any = _MISSING, split_fn: Callable = default_split_fn,
            map_non_graph_nodes: bool = False, ctxtag: Hashable | None = None,
            check_aliasing: bool = True) -> Any:
  """Replaces every graph node (Object, Variable) of a pytree with its `NodeStates`.

  All nodes are split in one `split_context` (tag `ctxtag`), so a node reached
  twice comes back shared from `from_tree`.

  Args:
    tree: a pytree holding Modules, Variables, arrays, ...
    prefix: a prefix tree of `tree` (e.g. vmap axes); each node's entry is
      passed to `split_fn`, and a Variable reached under two different
      entries is an error.
    split_fn: ``(ctx, keypath, prefix, node) -> leaf`` (default: `NodeStates`
      of ``ctx.split(node)``).
    map_non_graph_nodes: also pass the other leaves through `split_fn`.
    ctxtag: the update-context tag (see `update_context`).
    check_aliasing: check the prefixes of shared Variables (with `prefix`).

  Returns:
    The tree with graph nodes replaced.

  Raises:
    GraphError: a Variable reachable under two different prefixes ("Inconsistent
      aliasing detected").

  >>> import spmdnnx as nnx
  >>> m = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
  >>> pure = nnx.to_tree((m, 1, {"b": m}))
  >>> type(pure[0]).__name__, pure[1]
  ('NodeStates', 1)
  >>> back = nnx.from_tree(pure)
  >>> back[0] is back[2]["b"]
  True
  """
  leaves, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_node)
  if prefix is _MISSING or prefix is None:
    prefixes = [prefix] * len(leaves)
    check_aliasing = False
  else:
    prefixes = _leaf_prefixes(prefix, tree, _is_node)
  seen: dict = {}
  out = []
  with split_context(ctxtag) as ctx:
    for (keypath, leaf), p in zip(leaves, prefixes):
      if _is_node(leaf):
        if check_aliasing:
          _check_aliasing(seen, keypath, leaf, p)
        out.append(split_fn(ctx, keypath, p, leaf))
      elif map_non_graph_nodes:
        out.append(split_fn(ctx, keypath, p, leaf))
      else:
        out.append(leaf)
    if check_aliasing:
      _raise_inconsistent(seen, "to_tree")
  return jax.tree_util.tree_unflatten(treedef, out)


def from_tree(tree: Any, /, *, prefix: Any = _MISSING, merge_fn: Callable = default_merge_fn,
              is_node_leaf: Callable = _is_node_states, is_leaf: Callable = _is_node_states,
              map_non_graph_nodes: bool = False, is_inner: bool | None = None,
              ctxtag: Hashable | None = None) -> Any:
  """Inverse of `to_tree`: merges every `NodeStates` back into a graph node.

  All merges share one `merge_context` (tag `ctxtag`, `is_inner`), so nodes
  that were shared before `to_tree` are shared again.

  Args:
    tree: what `to_tree` returned (possibly transformed).
    prefix: a prefix tree, each entry passed to `merge_fn`.
    merge_fn: ``(ctx, keypath, prefix, leaf) -> node``.
    is_node_leaf: which leaves `merge_fn` gets (default: NodeStates).
    is_leaf: where flattening stops (default: NodeStates).
    map_non_graph_nodes: pass every leaf to `merge_fn`.
    is_inner: inside (True) or outside (False) a transform boundary.
    ctxtag: the update-context tag.

  >>> import spmdnnx as nnx
  >>> v = nnx.Param(1.0)
  >>> nnx.from_tree(nnx.to_tree([v]))[0].value
  1.0
  """
  leaves, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
  if prefix is _MISSING or prefix is None:
    prefixes = [prefix] * len(leaves)
  else:
    prefixes = _leaf_prefixes(prefix, tree, is_leaf)
  out = []
  with merge_context(ctxtag, is_inner) as ctx:
    for (keypath, leaf), p in zip(leaves, prefixes):
      if map_non_graph_nodes or is_node_leaf(leaf) or isinstance(leaf, Variable):
        leaf = merge_fn(ctx, keypath, p, leaf)
      out.append(leaf)
  return jax.tree_util.tree_unflatten(treedef, out)


def clear_non_graph_nodes(tree: Any) -> Any:
  """`tree` with every leaf that is not a graph node (Object, Variable) set to None.

  >>> import spmdnnx as nnx
  >>> v = nnx.Param(1.0)
  >>> out = clear_non_graph_nodes((v, 2))
  >>> out[0] is v, out[1]
  (True, None)
  """
  return jax.tree.map(lambda x: x if _is_node(x) else None, tree, is_leaf=_is_node)
