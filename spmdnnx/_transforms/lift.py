"""Moving graph objects across a JAX transform boundary.

A lifted transform takes arguments that may contain graph nodes (Modules,
Rngs, Optimizers, Variables) anywhere in their pytrees. Outside, `extract`
finds the nodes, splits them *jointly* (so references shared between
arguments stay shared) and hands the transform plain pytrees of state leaves.
Inside, `rebuild` makes fresh objects from those leaves; after the user's
function ran, `collect` splits them again and marks any graph nodes in the
output. Outside again, `apply_updates` writes the new state into the original
objects and `unmark_outputs` turns marked outputs back into objects.

Every graph traversal here is the one `graph.Walk` (`graph.flatten`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from spmdnnx import errors
from spmdnnx import _graph as graph
from spmdnnx import _tracectx as tracectx
from spmdnnx import _restructure as restructure_lib
from spmdnnx._graphdef import NodeSpec, PytreeSpec, RefSpec, VariableSpec
from spmdnnx._state import State
from spmdnnx._variables import Variable, detach, new_variable, write_back


class NodeSlot:
  """Stands for a graph node inside a flattened argument list (static)."""

  __slots__ = ("index",)

  def __init__(self, index: int):
    self.index = index

  def __eq__(self, other):
    return isinstance(other, NodeSlot) and other.index == self.index

  def __hash__(self):
    return hash((NodeSlot, self.index))

  def __repr__(self):
    return f"NodeSlot({self.index})"


@dataclasses.dataclass
class Extraction:
  """Everything `extract` learned about the graph nodes in some arguments."""
  treedef: Any                 # treedef of the arguments, nodes as leaves
  arg_leaves: list             # argument leaves, nodes replaced by NodeSlot
  nodes: tuple                 # unique live nodes, in order of appearance
  graphdef: graph.GraphDef     # joint GraphDef of `nodes` (a tuple)
  paths: list                  # path of every state leaf, DFS order
  leaves: list                 # detached state leaves (Variables / arrays)
  live: list                   # live Variables (None for raw arrays)
  has_raw: bool
  all_nodes: list              # every live node with identity, by GraphDef index
  static_containers: list      # static List/Dict values (watched by jit)


def extract(tree: Any, *, aliasing: bool = True, who: str = "transform",
            is_node: Any = graph.is_graph_node) -> Extraction:
  """Finds the graph nodes in a pytree and splits them jointly.

  With ``aliasing=False`` (tree mode, or ``graph_updates=False``), an object
  or Variable reachable twice is a `TransformError` naming both paths.
  `is_node` says which pytree leaves are root nodes (jit adds nnx.List/Dict).
  """
  leaves, treedef = jax.tree_util.tree_flatten(tree, is_leaf=is_node)
  nodes: list = []
  seen: dict[int, int] = {}
  arg_leaves = []
  for leaf in leaves:
    if is_node(leaf):
      i = seen.get(id(leaf))
      if i is None:
        i = seen[id(leaf)] = len(nodes)
        nodes.append(leaf)
      arg_leaves.append(NodeSlot(i))
    else:
      arg_leaves.append(leaf)
  nodes_t = tuple(nodes)
  if not aliasing and len(nodes) < sum(isinstance(x, NodeSlot) for x in arg_leaves):
    twice = [x.index for x in arg_leaves if isinstance(x, NodeSlot)]
    dup = next(i for i in twice if twice.count(i) > 1)
    raise_alias(who, f"argument node #{dup}", f"argument node #{dup} (passed twice)",
                nodes[dup])
  graphdef, w = graph.flatten(nodes_t)
  if not aliasing:
    check_no_aliases(graphdef, w, who)
  return Extraction(treedef, arg_leaves, nodes_t, graphdef,
                    [p for p, _ in w.pairs], [v for _, v in w.pairs],
                    w.variables, w.has_raw, w.nodes, w.static_containers)


def _spec_paths(spec: Any, path: tuple, first: dict, refs: list) -> None:
  """Records the first path of every node index and the path of every RefSpec."""
  kind = type(spec)
  if kind is RefSpec:
    refs.append((spec.index, path))
    return
  if kind in (NodeSpec, VariableSpec) and spec.index is not None:
    first.setdefault(spec.index, path)
  if kind is NodeSpec:
    for key, sub in spec.children:
      _spec_paths(sub, path + (key,), first, refs)
  elif kind is PytreeSpec:
    for key, sub in zip(spec.keys, spec.children):
      _spec_paths(sub, path + (key,), first, refs)


def check_no_aliases(graphdef: graph.GraphDef, w: Any, who: str) -> None:
  """Tree mode: refuses an object or Variable reachable at two paths."""
  first: dict = {}
  refs: list = []
  _spec_paths(graphdef.spec, (), first, refs)
  if refs:
    index, path = refs[0]
    raise_alias(who, errors.path_str(first.get(index, ())), errors.path_str(path),
                w.nodes[index] if index < len(w.nodes) else None)


def raise_alias(who: str, first: str, second: str, obj: Any) -> None:
  kind = type(obj).__name__ if obj is not None else "object"
  raise errors.TransformError(
      f"Duplicate {kind} found at paths:\n  - {first}\n  - {second}\n"
      f"nnx.{who} with graph=False or graph_updates=False does not support Variable "
      f"aliasing (an object or Variable passed twice, or an input returned as an "
      f"output). Fix: pass each object once (make a copy with nnx.clone), or use graph "
      f"mode with updates: nnx.{who}(..., graph=True, graph_updates=True).",
      paths=[first, second])


def plain_leaves(ex: Extraction) -> list:
  """The argument leaves that are not graph nodes, in order."""
  return [x for x in ex.arg_leaves if not isinstance(x, NodeSlot)]


def fill_plain(ex: Extraction, plain: list) -> list:
  """Argument leaves with the plain ones replaced (NodeSlots kept)."""
  it = iter(plain)
  return [x if isinstance(x, NodeSlot) else next(it) for x in ex.arg_leaves]


class Rebuilt:
  """Inside a transform: the fresh nodes and where each came from."""
  __slots__ = ("nodes", "origin", "graphdef")

  def __init__(self, nodes, origin, graphdef):
    self.nodes = nodes          # tuple of fresh root nodes
    self.origin = origin        # id(fresh node) -> index in the outer GraphDef
    self.graphdef = graphdef    # GraphDef the fresh nodes had when rebuilt


def rebuild(graphdef: graph.GraphDef, leaves: list, treedef: Any,
            arg_leaves: list, *, regraph: bool = False) -> tuple[Any, Rebuilt]:
  """Inside a transform: fresh nodes from state leaves, put back into the args.

  With `regraph`, the rebuilt nodes' GraphDef is recomputed (for transforms
  that changed metadata on the way in, e.g. removed a stacked axis name).
  """
  it = iter(leaves)

  def take(path, spec):
    leaf = next(it)
    if type(spec) is VariableSpec:
      return detach(leaf) if isinstance(leaf, Variable) else \
          new_variable(spec.type, leaf, frozen=spec.metadata)
    return _raw(leaf)

  builder = graph.Builder(take)
  nodes = builder.build(graphdef.spec, ())
  origin = {id(obj): idx for idx, obj in builder.nodes.items()}
  inner_graphdef = graph.graphdef(nodes) if regraph else graphdef
  filled = [nodes[x.index] if isinstance(x, NodeSlot) else x for x in arg_leaves]
  return jax.tree_util.tree_unflatten(treedef, filled), Rebuilt(nodes, origin, inner_graphdef)


def _raw(x):
  return x.raw_value if isinstance(x, Variable) else x


# --- outputs ---------------------------------------------------------------------


class InputRef:
  """Output marker: this output is (part of) input node `index` at `path`."""

  __slots__ = ("index", "path")

  def __init__(self, index: int, path: tuple):
    self.index, self.path = index, path

  def __eq__(self, other):
    return isinstance(other, InputRef) and (other.index, other.path) == (self.index, self.path)

  def __hash__(self):
    return hash((InputRef, self.index, self.path))


class NodeOut:
  """Output marker carrying a new graph node as (GraphDef, State).

  ``key`` (static) is the same for every output position holding the same
  new object, so `unmark_outputs` gives them one object again; None: no
  sharing recorded (each marker becomes its own object).
  """

  __slots__ = ("graphdef", "state", "key")

  def __init__(self, graphdef, state, key=None):
    self.graphdef, self.state, self.key = graphdef, state, key


jax.tree_util.register_pytree_node(InputRef, lambda r: ((), (r.index, r.path)),
                                   lambda aux, _: InputRef(*aux))
jax.tree_util.register_pytree_node(NodeOut, lambda n: ((n.state,), (n.graphdef, n.key)),
                                   lambda aux, c: NodeOut(aux[0], c[0], aux[1]))


class Restructure:
  """Static record of a structure change made inside a transform."""
  __slots__ = ("graphdef", "reuse", "paths")

  def __init__(self, graphdef, reuse, paths):
    self.graphdef = graphdef    # the new GraphDef of the root nodes tuple
    self.reuse = reuse          # new node index -> outer GraphDef node index
    self.paths = paths          # paths of the new state leaves


def collect(rebuilt: Rebuilt, out: Any, *, identity: bool | str = False) -> tuple:
  """Inside a transform, after the user's function: new state and marked outputs.

  With `identity`, objects or Variables that moved (e.g. two sub-modules of
  one type swapped) or were replaced by new ones count as a structure change
  even if the GraphDef is equal; with ``identity="moved"`` only moves do
  (a new Variable at an old one's place takes its value by position).

  Returns:
    ``(new_leaves, restructure, out, has_nodes)``: the state leaves of the
    nodes in DFS order; a `Restructure` if the nodes' structure changed (else
    None); `out` with graph nodes replaced by InputRef / NodeOut markers.
  """
  graphdef, w = graph.flatten(rebuilt.nodes)
  new_leaves = [v for _, v in w.pairs]
  restructure = None
  origin = rebuilt.origin
  if identity == "moved":
    changed = any(origin.get(id(n), i) != i for i, n in enumerate(w.nodes))
  else:
    changed = bool(identity) and any(origin.get(id(n)) != i for i, n in enumerate(w.nodes))
  if graphdef != rebuilt.graphdef or changed:
    reuse = {i: origin[id(n)] for i, n in enumerate(w.nodes) if id(n) in origin}
    restructure = Restructure(graphdef, reuse, [p for p, _ in w.pairs])
  out, has_nodes = mark_outputs(rebuilt.nodes, w, out)
  return new_leaves, restructure, out, has_nodes


def run_inside(graphdef: graph.GraphDef, treedef: Any, leaves: list, arg_leaves: list,
               call: Any, what: str, *, regraph: bool = False,
               identity: bool | str = False) -> tuple:
  """Inside a transform: rebuild the arguments, run ``call(args)``, collect.

  Runs in a fresh trace frame named `what`. Returns what `collect` returns.
  """
  with tracectx.frame(what):
    args, rebuilt = rebuild(graphdef, leaves, treedef, arg_leaves, regraph=regraph)
    return collect(rebuilt, call(args), identity=identity)


def require_kept_structure(restructure: "Restructure | None", what: str, who: str,
                           hint: str) -> None:
  """Raises if the function added or removed Variables or sub-modules."""
  if restructure is not None:
    raise errors.TransformError(
        f"{what}: {who} added, removed or swapped Variables or sub-modules (paths "
        f"{errors.format_paths(map(errors.path_str, restructure.paths))}); {hint}")


def require_no_new_nodes(out: Any, has_nodes: bool, what: str, who: str, hint: str) -> None:
  """Raises if the (marked) output holds graph objects the function created."""
  if has_nodes and any(isinstance(m, NodeOut) for m in
                       jax.tree_util.tree_leaves(out, is_leaf=_is_marker)):
    raise errors.TransformError(f"{what}: {who} returned new graph objects; {hint}")


def fun_name(f: Any) -> str:
  """A function's readable name for messages."""
  return getattr(f, "__qualname__", getattr(f, "__name__", repr(f)))


def mark_outputs(nodes: tuple, walk: graph.Walk, out: Any) -> tuple[Any, bool]:
  """Replaces graph nodes in `out` by InputRef (inputs) or NodeOut (new).

  `walk` is the `graph.Walk` of the `nodes` tuple: a sub-node of an input
  (at any depth, pytrees included) is marked with its path in that walk.
  """
  leaves, treedef = jax.tree_util.tree_flatten(out, is_leaf=graph.is_graph_node)
  if not any(graph.is_graph_node(x) for x in leaves):
    return out, False
  where: dict[int, tuple] = {id(node): (i, ()) for i, node in enumerate(nodes)}
  for path, sub in walk.trail:
    if path and graph.is_graph_node(sub):
      where.setdefault(id(sub), (path[0], path[1:]))
  marked = []
  new_keys: dict[int, int] = {}
  for leaf in leaves:
    if graph.is_graph_node(leaf):
      if id(leaf) in where:
        marked.append(InputRef(*where[id(leaf)]))
      else:
        key = new_keys.setdefault(id(leaf), len(new_keys))
        marked.append(NodeOut(*graph.split(leaf), key))
    else:
      marked.append(leaf)
  return jax.tree_util.tree_unflatten(treedef, marked), True


def apply_updates(ex: Extraction, new_leaves: list, restructure: Restructure | None) -> None:
  """Outside: writes the transform's new state into the original objects."""
  if restructure is not None:
    reuse = {new: ex.all_nodes[old] for new, old in restructure.reuse.items()
             if old >= 0}
    restructure_lib.rebuild_into(restructure.graphdef, new_leaves, reuse)
    return
  if ex.has_raw:
    graph.update(ex.nodes, State.from_flat_path(list(zip(ex.paths, new_leaves))))
    return
  for var, leaf in zip(ex.live, new_leaves):
    write_back(var, leaf)


def _is_marker(x) -> bool:
  return isinstance(x, (InputRef, NodeOut))


def unmark_outputs(nodes: tuple, out: Any) -> Any:
  """Outside: turns InputRef / NodeOut markers back into objects."""

  made: dict = {}

  def unmark(x):
    if isinstance(x, InputRef):
      node = nodes[x.index]
      for key in x.path:
        node = graph.child(node, key)
      return node
    if isinstance(x, NodeOut):
      if x.key is None:
        return graph.merge(x.graphdef, x.state)
      if x.key not in made:
        made[x.key] = graph.merge(x.graphdef, x.state)
      return made[x.key]
    return x

  return jax.tree.map(unmark, out, is_leaf=_is_marker)
