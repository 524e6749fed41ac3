"""Graph mode vs tree mode for vmap, scan and the control-flow transforms.

Each of `vmap`, `scan`, `cond`, `switch`, `fori_loop` and `while_loop` takes
``graph=`` and ``graph_updates=`` (None: the setting in force, see
`spmdnnx._modes`). With both True (the default) the transform is the full
graph-mode one: shared references, structure changes written back. Otherwise
it runs *simple*: an object or Variable reachable twice is an error, only the
values of the Variables that went in flow back (Variables or sub-modules
created inside, attributes reassigned inside, stay inside), and per-filter
`StateAxes` are refused, as in Flax.

>>> resolve_modes(None, False)
(True, False, True)
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping

import jax

from spmdnnx import errors
from spmdnnx import _graph as graph
from spmdnnx import _graph as graphlib
from spmdnnx import _modes as modes
from spmdnnx import _stacked as stacked
from spmdnnx import _tracectx as tracectx
from spmdnnx._graphdef import NodeSpec, PytreeSpec, RefSpec, VariableSpec
from spmdnnx._transforms import axes as axeslib
from spmdnnx._transforms import lift
from spmdnnx._transforms.axes import StateAxes
from spmdnnx._transforms.prefixes import TreeState
from spmdnnx._object import Dict as ObjDict, List as ObjList
from spmdnnx._state import State
from spmdnnx._variables import Variable, detach


def resolve_modes(graph_mode: bool | None, graph_updates: bool | None) -> tuple:
  """``(graph, graph_updates, simple)`` with None resolved; ``simple`` unless both."""
  g = modes.resolve_graph(graph_mode)
  gu = modes.resolve_graph_updates(graph_updates)
  return g, gu, not (g and gu)


def check_prefix(prefix: Any, name: str, who: str, graph_mode: bool,
                 graph_updates: bool) -> None:
  """Refuses axis specs a mode cannot honour (Flax's rules).

  Raises:
    TransformError: a Variable or graph object used as a spec, or a
      `StateAxes` when not in graph mode with graph updates.
  """
  leaves = jax.tree_util.tree_leaves_with_path(
      prefix, is_leaf=lambda x: x is None or isinstance(x, (StateAxes, Variable, TreeState))
      or graph.is_graph_node(x) or (graph_mode and isinstance(x, (ObjDict, ObjList))))
  for path, leaf in leaves:
    where = f"{name}{jax.tree_util.keystr(path)}"
    if graph_mode and isinstance(leaf, (ObjDict, ObjList)):
      raise errors.TransformError(
          f"nnx.{who}: {where} is an nnx.{type(leaf).__name__}: Graph nodes are not "
          "allowed as prefixes in graph mode. Fix: build the prefix with "
          "nnx.prefix(obj, {filter: axis}), use StateAxes, or pass graph=False.",
          paths=[where])
    if isinstance(leaf, Variable):
      raise errors.TransformError(
          f"nnx.{who}: {where} is a {type(leaf).__name__}: Variables prefixes are "
          "not supported. Give one spec (int, None) for the whole Variable or its "
          "owner.",
          paths=[where])
    if isinstance(leaf, StateAxes) and not (graph_mode and graph_updates):
      raise errors.TransformError(
          f"nnx.{who}: {where} cannot contain `StateAxes` objects unless graph=True "
          f"and graph_updates=True. Fix: pass nnx.{who}(..., graph=True, "
          "graph_updates=True), or give one int/None per argument.", paths=[where])
    if graph.is_graph_node(leaf) and graph_mode:
      raise errors.TransformError(
          f"nnx.{who}: {where} is a {type(leaf).__name__}: Graph nodes are not "
          "allowed as prefixes in graph mode. Fix: use StateAxes, or pass graph=False.",
          paths=[where])


def extract(tree: Any, graph_mode: bool, who: str) -> lift.Extraction:
  """`lift.extract`; with ``graph_mode=False`` a Variable or object reachable twice raises.

  Raises:
    TransformError: ``Duplicate <Variable type>`` naming both paths (tree
      mode), or an object reachable twice.
  """
  ex = lift.extract(tree)
  if not graph_mode:
    for index, (first, second, *_) in variable_occurrences(ex).items():
      raise_duplicate(who, ex.all_nodes[index], (first[0],) + first[1][1:],
                      (second[0],) + second[1][1:])
    lift.check_no_aliases(ex.graphdef, _Nodes(ex.all_nodes), who)
  return ex


class _Nodes:
  __slots__ = ("nodes",)

  def __init__(self, nodes):
    self.nodes = nodes


def raise_duplicate(who: str, var: Any, first: tuple, second: tuple) -> None:
  """Raises the tree-mode error for a Variable reachable at two paths."""
  kind = type(var).__name__
  a, b = errors.path_str(first), errors.path_str(second)
  raise errors.TransformError(
      f"Duplicate {kind}: the same {kind} is reachable at\n  - {a}\n  - {b}\n"
      f"nnx.{who} with graph=False or graph_updates=False does not support Variable "
      "aliasing (duplicate inputs, or inputs returned as outputs). Fix: pass each "
      f"Variable once (copy with nnx.clone), or use nnx.{who}(..., graph=True, "
      "graph_updates=True).", paths=[a, b])


def _spec_index(spec: Any, table: dict) -> None:
  kind = type(spec)
  if kind in (NodeSpec, VariableSpec) and spec.index is not None:
    table.setdefault(spec.index, spec)
  if kind is NodeSpec:
    for _, sub in spec.children:
      _spec_index(sub, table)
  elif kind is PytreeSpec:
    for sub in spec.children:
      _spec_index(sub, table)


def _var_paths(spec: Any, path: tuple, table: dict, out: dict, stack: set) -> None:
  kind = type(spec)
  if kind is RefSpec:
    target = table.get(spec.index)
    if target is None or spec.index in stack:
      return
    spec = target
    kind = type(spec)
  if kind is VariableSpec:
    out.setdefault(spec.index, []).append(path)
  elif kind is NodeSpec:
    if spec.index is not None:
      stack.add(spec.index)
    for key, sub in spec.children:
      _var_paths(sub, path + (key,), table, out, stack)
    if spec.index is not None:
      stack.discard(spec.index)
  elif kind is PytreeSpec:
    for key, sub in zip(spec.keys, spec.children):
      _var_paths(sub, path + (key,), table, out, stack)


def variable_occurrences(ex: lift.Extraction) -> dict:
  """Variables reachable more than once: ``{index: [(arg, path), ...]}``.

  ``arg`` is the argument position, ``path`` the path inside that argument
  (node index first, as in `Extraction.paths`); a node passed twice counts
  once per occurrence.
  """
  if type(ex.graphdef.spec) is not NodeSpec:
    return {}
  table: dict = {}
  _spec_index(ex.graphdef.spec, table)
  by_root: dict = {}
  for (key, sub) in ex.graphdef.spec.children:
    paths: dict = {}
    _var_paths(sub, (key,), table, paths, set())
    by_root[key] = paths
  where: dict = {}
  for arg, root in root_occurrences(ex):
    for index, paths in by_root.get(root, {}).items():
      where.setdefault(index, []).extend((arg, p) for p in paths)
  return {i: w for i, w in where.items() if len(w) > 1}


def root_occurrences(ex: lift.Extraction) -> list:
  """``(argument position, root node index)`` for every node occurrence."""
  out = []
  treedef = ex.treedef
  # The extracted tree is the tuple of arguments: its children are the args.
  children = treedef.children()
  i = 0
  for arg, child in enumerate(children):
    for leaf in ex.arg_leaves[i:i + child.num_leaves]:
      if isinstance(leaf, lift.NodeSlot):
        out.append((arg, leaf.index))
    i += child.num_leaves
  return out


def check_consistent(ex: lift.Extraction, specs: tuple, who: str, *,
                     axis_of: Callable | None = None) -> None:
  """Graph mode: a Variable reachable twice must get one axis spec.

  Args:
    axis_of: ``axis_of(arg, path, variable)`` the spec of one occurrence
      (`path` starts with the node index); default: read ``specs[arg]``.

  Raises:
    TransformError: ``Inconsistent aliasing detected`` listing each path
      with its spec.
  """
  if axis_of is None:
    axis_of = lambda arg, path, var: axeslib.axis_for(specs[arg], path, var)
  msgs = []
  for index, occ in variable_occurrences(ex).items():
    var = ex.all_nodes[index]
    axes = [axis_of(arg, path, var) for arg, path in occ]
    if len({repr(a) for a in axes}) > 1:
      lines = "\n".join(f"  {errors.path_str(p[1:])}: {a!r}" for (_, p), a in zip(occ, axes))
      msgs.append(f"{type(var).__name__}:\n{lines}")
  if msgs:
    raise errors.TransformError(
        f"nnx.{who}: Inconsistent aliasing detected. The following nodes have different "
        f"prefixes (a Variable reachable at several paths gets different axes):\n"
        + "\n".join(msgs) + "\nFix: give every occurrence of a shared object the same "
        "spec.")


# --- per-object prefixes (nnx.prefix trees, States, Module-shaped specs) ----------

_MISSING = object()


def _is_scalar_spec(spec: Any) -> bool:
  return spec is None or spec is axeslib.Carry or isinstance(spec, int)


def _child_spec(spec: Any, key: Any) -> Any:
  """The part of a prefix tree below `key` (a Mapping key, an index, an attribute)."""
  if isinstance(spec, Mapping):
    return spec[key] if key in spec else _MISSING
  if isinstance(spec, (list, tuple)):
    return spec[key] if isinstance(key, int) and -len(spec) <= key < len(spec) else _MISSING
  if isinstance(key, str) and not isinstance(spec, Variable):
    return getattr(spec, key, _MISSING)
  return _MISSING


def prefix_axis(spec: Any, path: tuple, leaf: Any) -> Any:
  """The axis spec of the state leaf at `path` (relative to its object) from its prefix.

  `spec` is what the object's position in ``in_axes``/``out_axes`` holds: an
  int, None or Carry (every leaf); a `StateAxes` (filters); a `TreeState`
  from ``nnx.prefix(..., graph=True)`` (its prefix function); or a prefix
  tree of the object's shape (a `State`, a Module from
  ``nnx.prefix(..., graph=False)``, nested dicts), read along `path` down to
  the first int/None. Returns `axes.UNMATCHED` where nothing gives a value.

  >>> from spmdnnx._state import State
  >>> prefix_axis(State({"w": 0, "b": None}), ("w",), None)
  0
  """
  if _is_scalar_spec(spec):
    return spec
  if isinstance(spec, StateAxes):
    return axeslib.axis_for(spec, (None,) + tuple(path), leaf)
  if isinstance(spec, TreeState) and spec.prefix_fn is not None:
    try:
      return spec.prefix_fn(tuple(path), leaf)
    except errors.TransformError:  # a {filter: value} map that matches nothing here
      return axeslib.UNMATCHED
  cur = spec
  for i, key in enumerate(path):
    if _is_scalar_spec(cur):
      return cur
    if isinstance(cur, StateAxes):
      return axeslib.axis_for(cur, (None,) + tuple(path[i:]), leaf)
    cur = _child_spec(cur, key)
    if cur is _MISSING:
      return axeslib.UNMATCHED
  return cur if _is_scalar_spec(cur) else axeslib.UNMATCHED


def _spec_at(spec: Any, keypath: tuple) -> Any:
  """The spec of the pytree position `keypath` inside an argument (JAX prefix rules)."""
  for k in keypath:
    if type(spec) not in (list, tuple, dict):
      return spec
    key = next((getattr(k, a) for a in ("key", "idx") if hasattr(k, a)), k)
    try:
      spec = spec[key]
    except (KeyError, IndexError, TypeError):
      return spec
  return spec


def node_prefixes(args: tuple, specs: tuple, ex: lift.Extraction) -> tuple[list, dict]:
  """Each graph object's spec: ``(per node index, {(arg, node index): spec})``.

  The first list gives the spec of a node's first occurrence; the dict every
  occurrence's (for the aliasing check).
  """
  index = {id(n): i for i, n in enumerate(ex.nodes)}
  first: list = [None] * len(ex.nodes)
  seen: set = set()
  occ: dict = {}
  for arg, (value, spec) in enumerate(zip(args, specs)):
    for keypath, leaf in jax.tree_util.tree_flatten_with_path(
        value, is_leaf=graph.is_graph_node)[0]:
      i = index.get(id(leaf)) if graph.is_graph_node(leaf) else None
      if i is None:
        continue
      sub = _spec_at(spec, keypath)
      occ.setdefault((arg, i), sub)
      if i not in seen:
        seen.add(i)
        first[i] = sub
  return first, occ


def prefix_leaf_axes(ex: lift.Extraction, node_spec: list, what: str) -> list:
  """One axis spec per state leaf of `ex`, read from each object's prefix.

  Raises:
    TransformError: listing the state leaves no prefix covers.
  """
  out = []
  unmatched = []
  kinds = set()
  for path, leaf in zip(ex.paths, ex.leaves):
    axis = prefix_axis(node_spec[path[0]], path[1:], leaf)
    if axis is axeslib.UNMATCHED:
      unmatched.append(path[1:])
      kinds.add(isinstance(node_spec[path[0]], StateAxes))
      axis = None
    out.append(axis)
  if unmatched:
    what_gives = "StateAxes filters" if kinds == {True} else "the axis prefixes"
    raise errors.TransformError(
        f"{what}: {what_gives} do not cover {len(unmatched)} state leaves: "
        f"{errors.format_paths(errors.path_str(p) for p in unmatched)}. Add a catch-all "
        "entry such as `...: None` to the StateAxes, or build the prefix with "
        "nnx.prefix(obj, {filter: axis, ...: None}) from the same object.",
        paths=list(unmatched))
  return out


def is_object_prefix(spec: Any) -> bool:
  """Whether an axis spec gives per-Variable values (StateAxes, State, Module-shaped)."""
  return isinstance(spec, (StateAxes, State)) or graph.is_graph_node(spec)


def run_inside_simple(graphdef: graph.GraphDef, treedef: Any, leaves: list,
                      arg_leaves: list, call: Callable, what: str) -> tuple:
  """Simple-mode `lift.run_inside`: only the incoming Variables' values come back.

  Returns:
    ``(new_leaves, None, out, has_nodes)``: one leaf per incoming state leaf
    (the fresh Variable's current value, or the raw array now at its path).
  """
  with tracectx.frame(what):
    args, rebuilt = lift.rebuild(graphdef, leaves, treedef, arg_leaves)
    _, before = graph.flatten(rebuilt.nodes, detach_variables=False)
    fresh = list(before.variables)
    paths = [p for p, _ in before.pairs]
    out = call(args)
    _, after = graph.flatten(rebuilt.nodes)
    now = dict(after.pairs) if any(v is None for v in fresh) else {}
    new_leaves = []
    for var, path, old in zip(fresh, paths, leaves):
      if var is not None:
        new_leaves.append(detach(var))
      else:
        raw = now.get(path, old)
        new_leaves.append(old if isinstance(raw, Variable) else raw)
    check_captured(out, after, what, simple=True)
    out, has_nodes = lift.mark_outputs(rebuilt.nodes, after, out)
    return new_leaves, None, out, has_nodes


def check_captured(out: Any, walk: Any, what: str, simple: bool) -> None:
  """Refuses returning an object (Module, Rngs...) captured from outside the transform.

  Such an object was created outside (another trace frame) and was not an
  argument: returning it would hand back a copy that silently drops any
  change, so it is an error (pass it as an argument instead).

  Raises:
    TransformError: naming the object's type.
  """
  leaves = jax.tree_util.tree_leaves(out, is_leaf=graph.is_graph_node)
  nodes = [x for x in leaves if graph.is_graph_node(x)]
  if not nodes:
    return
  frame = tracectx.current_frame()
  # Frames that enclose this one (None: outside every transform). Objects made
  # in a nested transform that already returned are this frame's results.
  enclosing = {id(f) for f in tracectx._LOCAL.frames[:-1]} | {id(None)}
  inputs = {id(v) for _, v in walk.trail}
  for node in nodes:
    if id(node) in inputs:
      continue
    # Only Objects: detached Variable copies (e.g. gradients) keep their
    # source's frame, so a Variable's frame does not tell where it was made.
    made = frame if isinstance(node, Variable) else getattr(node, "_object__trace", frame)
    if id(made) in enclosing:
      rule = ("Cannot return captured Variable" if simple else
              "Cannot extract graph node from different trace level")
      raise errors.TransformError(
          f"{what}: {rule}: the function returned a {type(node).__name__} it did not "
          "receive as an argument and did not create (captured from an enclosing "
          "scope). Pass it as an argument, or return arrays.")


def run_inside(simple: bool, graphdef: graph.GraphDef, treedef: Any, leaves: list,
               arg_leaves: list, call: Callable, what: str, *,
               regraph: bool = False, identity: bool | str = False) -> tuple:
  """`lift.run_inside` in graph mode, `run_inside_simple` otherwise.

  With ``identity`` (graph mode), objects that moved inside (swapped
  sub-modules) are a structure change, so they come back moved.

  Raises:
    TransformError: the function returned an object captured from outside.
  """
  if simple:
    return run_inside_simple(graphdef, treedef, leaves, arg_leaves, call, what)

  def checked(args):
    out = call(args)
    _, w = graph.flatten(args, detach_variables=False)
    check_captured(out, w, what, simple=False)
    return out

  return lift.run_inside(graphdef, treedef, leaves, arg_leaves, checked, what,
                         regraph=regraph, identity=identity)


def check_same_variables(fresh: list, nodes: tuple, who: str) -> None:
  """Simple-mode loops: the body must keep the Variables it was given.

  Raises:
    TransformError: an attribute now holds a different Variable.
  """
  now = graph.flatten(nodes, detach_variables=False)[1].pairs
  if len(now) != len(fresh) or any(
      a is not b for (_, a), (_, b) in zip(now, fresh) if isinstance(b, Variable)):
    changed = [errors.path_str(p) for (p, a), (_, b) in zip(now, fresh) if a is not b]
    raise errors.TransformError(
        f"{who} Variable identity must be preserved across iterations: the body "
        f"replaced Variables ({errors.format_paths(changed) or 'structure changed'}). "
        "Assign values in place (v[...] = x) instead of new Variables.",
        paths=changed)


def check_returned_inputs(ex: lift.Extraction, out: Any, out_specs: list, in_specs: tuple,
                          node_arg: list, graph_updates: bool, who: str) -> None:
  """Checks input objects a mapped function returned (`out` holds markers).

  Raises:
    TransformError: in simple mode, ``Duplicate ...`` (an input returned as
      an output would alias it); in graph mode, ``Inconsistent aliasing``
      when its out spec differs from its in spec.
  """
  leaves = jax.tree_util.tree_leaves(out, is_leaf=lift._is_marker)
  for i, (leaf, spec) in enumerate(zip(leaves, out_specs)):
    if not isinstance(leaf, lift.InputRef):
      continue
    node = ex.nodes[leaf.index]
    for key in leaf.path:
      node = graphlib.child(node, key)
    where = (node_arg[leaf.index],) + tuple(leaf.path)
    if not graph_updates:
      pairs = graph.flatten(node, detach_variables=False)[1].pairs
      sub, var = next(((p, v) for p, v in pairs if isinstance(v, Variable)), ((), node))
      raise_duplicate(who, var, where + tuple(sub), ("output", i) + tuple(sub))
    in_spec = in_specs[node_arg[leaf.index]]
    if not isinstance(in_spec, StateAxes) and repr(in_spec) != repr(spec):
      raise errors.TransformError(
          f"nnx.{who}: Inconsistent aliasing detected: {type(node).__name__} at "
          f"{errors.path_str(where)} goes in with axis {in_spec!r} and is returned "
          f"with axis {spec!r}:\n  {errors.path_str(where)}: {in_spec!r}\n  "
          f"output {i}: {spec!r}\nFix: return it with out_axes {in_spec!r}, or "
          "return a copy (nnx.clone).", paths=[errors.path_str(where)])


PARTITION_ATTR = "__spmdnnx_partition__"


def transform_metadata(f: Callable | None = None, *, in_axes: Any = 0, out_axes: Any = 0,
                       partition: str | None, graph: bool | None = None) -> Callable:
  """Names the mapped axis of a function that `vmap` / `scan` will map.

  The returned function behaves like `f`; a `vmap` or `scan` applied to it
  records `partition` (instead of the default ``"layers"``) as the logical
  name of the mapped axis in the Variables it maps or creates, in any mode.
  This is Flax's way of naming that axis under ``graph_updates=False``;
  ``vmap(..., transform_metadata={"partition_name": ...})`` does the same.

  Args:
    f: the function (None: return a decorator).
    in_axes, out_axes: accepted for Flax compatibility (the enclosing
      transform's own specs decide which Variables are mapped).
    partition: the logical axis name.
    graph: accepted for Flax compatibility.

  >>> import jax, jax.numpy as jnp
  >>> import spmdnnx as nnx
  >>> @nnx.vmap(in_axes=0, out_axes=0, graph_updates=False)
  ... @nnx.transform_metadata(partition="experts")
  ... def make(key):
  ...   return nnx.Param(jax.random.normal(key, (2,)), logical_axes=("embed",))
  >>> make(jax.random.split(jax.random.key(0), 3)).logical_axes
  ('experts', 'embed')
  """
  del graph
  if f is None:
    return lambda g: transform_metadata(g, in_axes=in_axes, out_axes=out_axes,
                                        partition=partition)
  check_prefix(in_axes, "in_axes", "transform_metadata", True, True)
  check_prefix(out_axes, "out_axes", "transform_metadata", True, True)

  @functools.wraps(f)
  def wrapper(*args, **kwargs):
    if any(n.startswith(("vmap(", "scan(")) for n in tracectx.active_names()):
      return f(*args, **kwargs)  # the enclosing vmap/scan names the axis itself
    return _moved_call(f, args, kwargs, in_axes, out_axes, partition)

  setattr(wrapper, PARTITION_ATTR, partition)
  return wrapper


def _variables_at(tree: Any, axes: Any) -> list[tuple[Variable, int]]:
  """``(Variable, axis)`` for the Variables of ``tree`` (a tuple of args or an
  output) that an int prefix of ``axes`` maps, each once."""
  found: dict = {}

  def visit(x: Any, axis: Any) -> None:
    if axis is None or isinstance(axis, bool) or not isinstance(axis, (int, tuple)):
      return
    if isinstance(axis, tuple):
      if isinstance(x, (tuple, list)) and len(x) == len(axis):
        for xi, ai in zip(x, axis):
          visit(xi, ai)
      return
    if isinstance(x, Variable):
      found.setdefault(id(x), (x, axis))
    elif graph.is_graph_node(x):
      for _, v in graph.iter_graph(x):
        if isinstance(v, Variable):
          found.setdefault(id(v), (v, axis))
    else:
      for v in jax.tree.leaves(x, is_leaf=lambda y: isinstance(y, Variable)
                               or graph.is_graph_node(y)):
        visit(v, axis)

  visit(tree, axes)
  return list(found.values())


def _moved_call(f: Callable, args: tuple, kwargs: dict, in_axes: Any, out_axes: Any,
                partition: str | None) -> Any:
  """Calls ``f`` outside vmap/scan as Flax's ``transform_metadata`` does.

  The mapped axis is removed from the metadata of the Variables in ``args``
  (per ``in_axes``) while ``f`` runs and put back afterwards; the Variables
  in the output get it added (per ``out_axes``). Values are left alone.
  """
  inputs = _variables_at(tuple(args), in_axes if isinstance(in_axes, tuple)
                         else (in_axes,) * len(args))
  for var, axis in inputs:
    var._set_meta(dict(stacked.move_axis(var, axis, partition, False)._metadata()))
  try:
    out = f(*args, **kwargs)
  finally:
    for var, axis in inputs:
      var._set_meta(dict(stacked.move_axis(var, axis, partition, True)._metadata()))
  seen = {id(v) for v, _ in inputs}
  for var, axis in _variables_at(out, out_axes):
    if id(var) not in seen:
      var._set_meta(dict(stacked.move_axis(var, axis, partition, True)._metadata()))
  return out


def partition_of(f: Callable) -> str | None:
  """The axis name `transform_metadata` attached to `f` (None if not set)."""
  return getattr(f, PARTITION_ATTR, None)
