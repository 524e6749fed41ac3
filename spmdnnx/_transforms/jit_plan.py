"""The plan of an `nnx.jit` call: what to lift, shard, donate, and the compiled step.

Planning looks once at a call's arguments and classifies every argument
position (positional or keyword):

- ``STATIC``: a static argument (``static_argnums`` / ``static_argnames``),
  handed to `jax.jit` as such;
- ``NODE``: the argument *is* a graph node (Module, Optimizer, Rngs, Variable),
  or an nnx.List / nnx.Dict holding graph nodes (changes to it flow back);
- ``TREE``: a list / tuple / dict / pytree that holds graph nodes somewhere;
- ``PLAIN``: anything else (arrays, scalars, batches), passed to `jax.jit` as is.

The graph nodes of all positions are split *jointly* (`lift.extract`), so a
Module passed twice, or a model held both by an argument and by an Optimizer,
stays one object inside. The state leaves (Variables and raw arrays on
Modules) get, under `use_sharding`, a NamedSharding each from their logical
axes and the rules, and are moved there once. Donated leaves (all of them
under `use_sharding` unless ``donate_state=False``; else those of nodes in
``donate_argnums`` / ``donate_argnames`` positions) travel in one list, kept
leaves in another. The compiled step is a `jax.jit` of `_inner` specialised to
the layout, cached by everything that determines the trace, so an identical
model rebuilt later does not recompile.

`JitWrapped` (in ``jit.py``) keeps plans and reuses one while it is valid:
same structure epoch, same sharding context, the same node objects in the
same positions (see docs/architecture.md).
"""

from __future__ import annotations

import weakref
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from spmdnnx import errors
from spmdnnx import _graph as graph
from spmdnnx._object import Dict, List, Object
from spmdnnx._graphdef import ArraySpec, NodeSpec, PytreeSpec, StaticSpec, VariableSpec
from spmdnnx._state import State
from spmdnnx.spmd import _resolve as resolve_lib
from spmdnnx._transforms import lift
from spmdnnx._variables import Variable

STATIC, NODE, TREE, PLAIN = "static", "node", "tree", "plain"
NODE_TYPES = (Object, Variable)
# Argument types that cannot hold graph nodes: checked by type, not walked.
# The concrete jax.Array classes are added when first seen (has_nested_nodes).
LEAF_TYPES = {np.ndarray, int, float, bool, complex, str, type(None), np.float32,
              np.int32, np.float64, np.int64}
_RAW_SET = Variable.raw_value.__set__


def ref_to(x: Any) -> Callable[[], Any]:
  """A weak reference when the object allows one, else a strong one."""
  try:
    return weakref.ref(x)
  except TypeError:
    return lambda: x


def has_nested_nodes(x: Any) -> bool:
  """Whether a non-node argument holds graph nodes anywhere in its pytree."""
  if type(x) in LEAF_TYPES:
    return False
  if isinstance(x, jax.Array):
    LEAF_TYPES.add(type(x))
    return False
  leaves = jax.tree_util.tree_leaves(x, is_leaf=graph.is_graph_node)
  return any(isinstance(v, NODE_TYPES) for v in leaves)


def is_root(x: Any) -> bool:
  """A root node of a plan: a graph node, or a List/Dict that holds graph nodes."""
  return isinstance(x, NODE_TYPES) or (isinstance(x, (List, Dict)) and has_nested_nodes(x))


class RawSlot:
  """Where a raw array attribute of a Module lives: read and written in place.

  Writing goes around the Object's tracking (the structure does not change:
  an array replaces an array), so it does not invalidate plans.
  """

  __slots__ = ("parent", "key")

  def __init__(self, parent: Any, key: Any):
    self.parent, self.key = weakref.ref(parent), key

  def get(self) -> Any:
    parent = self.parent()
    return parent.__dict__[self.key] if isinstance(parent, Object) else parent[self.key]

  def set(self, value: Any) -> None:
    parent = self.parent()
    if isinstance(parent, Object):
      object.__setattr__(parent, self.key, value)
    elif isinstance(parent, List):
      list.__setitem__(parent, self.key, value)
    else:
      dict.__setitem__(parent, self.key, value)


def raw(x: Any) -> Any:
  """The value of a Variable, or x itself."""
  return x.raw_value if isinstance(x, Variable) else x


def _is_marker(x: Any) -> bool:
  return isinstance(x, (lift.InputRef, lift.NodeOut))


def _child(parent: Any, key: Any) -> Any:
  if isinstance(parent, Object):
    return parent.__dict__[key]
  return parent[key]


class FixedValue:
  """A raw leaf that cannot be written in place (inside a tuple or pytree).

  A plan holding one is used for one call only; the new value is written back
  through `lift.apply_updates`.
  """

  __slots__ = ("value",)

  def __init__(self, value: Any):
    self.value = value

  def get(self) -> Any:
    return self.value

  def set(self, value: Any) -> None:
    self.value = value


def raw_slot(roots: tuple, path: tuple, leaf: Any) -> RawSlot | FixedValue:
  """Where the raw leaf at ``path`` (root index first) is read and written."""
  parent = roots[path[0]]
  try:
    for key in path[1:-1]:
      parent = _child(parent, key)
  except (KeyError, IndexError, TypeError):  # the path crosses a registered pytree
    return FixedValue(leaf)
  if isinstance(parent, (Object, List, Dict)):
    return RawSlot(parent, path[-1])
  return FixedValue(leaf)


def is_deleted(x: Any) -> bool:
  """Whether x is a concrete jax.Array whose buffers were deleted (donated)."""
  return isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer) and x.is_deleted()


def arg_name(j: int, nargs: int, kw_names: tuple) -> str:
  return f"argument {j}" if j < nargs else f"argument {kw_names[j - nargs]!r}"


def root_names(values: list, kinds: list, details: list, nargs: int, kw_names: tuple) -> tuple:
  """A readable name per root node: where it was passed (``argument 1['opt']``)."""
  names: dict[int, str] = {}
  for j, (value, kind, detail) in enumerate(zip(values, kinds, details)):
    arg = arg_name(j, nargs, kw_names)
    if kind == NODE:
      names.setdefault(detail.index, arg)
    elif kind == TREE:
      keyed = jax.tree_util.tree_flatten_with_path(value, is_leaf=graph.is_graph_node)[0]
      for (keypath, _), x in zip(keyed, detail[1]):
        if isinstance(x, lift.NodeSlot):
          names.setdefault(x.index, arg + jax.tree_util.keystr(keypath))
  return tuple(names[i] for i in range(len(names)))


def leaf_label(path: tuple, names: tuple) -> str:
  """A state leaf's path for messages: ``up/kernel (in argument 0)``."""
  if len(path) == 1:
    return names[path[0]]
  return f"{errors.path_str(path[1:])} (in {names[path[0]]})"


def deleted_error(fun_name: str, labels: list, args: list,
                  cause: Exception | None = None) -> errors.DonatedArrayError:
  """The error for inputs whose arrays a donating step deleted."""
  where = errors.format_paths(labels + args) or "one of the inputs"
  err = errors.DonatedArrayError.build(f"jit({fun_name})", where, paths=labels, arguments=args)
  err.__cause__ = cause
  return err


def check_not_deleted(fun_name: str, ex: lift.Extraction, values: list, kinds: list,
                      names: tuple, nargs: int, kw_names: tuple) -> None:
  """At planning: raises DonatedArrayError if any input array was deleted."""
  labels = [leaf_label(p, names) for p, leaf in zip(ex.paths, ex.leaves)
            if is_deleted(raw(leaf))]
  args = [arg_name(j, nargs, kw_names) for j, (v, k) in enumerate(zip(values, kinds))
          if k in (PLAIN, TREE) and any(map(is_deleted, jax.tree_util.tree_leaves(
              v, is_leaf=graph.is_graph_node)))]
  if labels or args:
    raise deleted_error(fun_name, labels, args)


class Cell:
  """Trace-time facts about the inner function (set while tracing)."""
  __slots__ = ("has_nodes", "restructure", "has_refs")

  def __init__(self):
    self.has_nodes = False
    self.restructure = None
    self.has_refs = False   # the output holds mutable array references (jax.Ref)


class RefOut:
  """Output marker for a `jax.Ref` returned from inside `jit` (which cannot return one).

  An input reference is named by ``(argument position, leaf index)`` and is
  given back as the caller's object; a new one carries its value and becomes
  a new reference outside.
  """

  __slots__ = ("where", "value")

  def __init__(self, where: tuple | None, value: Any = None):
    self.where, self.value = where, value


jax.tree_util.register_pytree_node(
    RefOut, lambda r: ((() if r.where else (r.value,)), r.where),
    lambda where, c: RefOut(where, None if where else c[0]))


def mark_refs(out: Any, positions: tuple, cell: Cell) -> Any:
  """Inside the trace: replaces the references in `out` by `RefOut` markers."""
  leaves, treedef = jax.tree_util.tree_flatten(out)
  if not any(isinstance(x, jax.Ref) for x in leaves):
    return out
  inputs = {id(x): (j, k) for j, p in enumerate(positions)
            for k, x in enumerate(jax.tree_util.tree_leaves(p)) if isinstance(x, jax.Ref)}
  cell.has_refs = True
  return jax.tree_util.tree_unflatten(treedef, [
      x if not isinstance(x, jax.Ref) else
      RefOut(inputs[id(x)]) if id(x) in inputs else RefOut(None, x[...]) for x in leaves])


def unmark_refs(out: Any, positions: tuple) -> Any:
  """Outside: input references back as the caller's objects, new ones as new refs."""

  def unmark(x):
    if not isinstance(x, RefOut):
      return x
    if x.where is None:
      return jax.new_ref(x.value)
    j, k = x.where
    return jax.tree_util.tree_leaves(positions[j])[k]

  return jax.tree_util.tree_map(unmark, out, is_leaf=lambda x: isinstance(x, RefOut))


class Plan:
  """Everything a call needs, computed once per argument layout (module doc).

  Attributes:
    epoch: the structure epoch the plan was made at (stale when it moved).
    ctx: the sharding context it was made under.
    nargs, kw_names: number of positional arguments and keyword names.
    node_checks: ``(position, ref)`` of NODE positions (identity checks).
    plain_pos: PLAIN positions (checked to hold no graph node).
    tree_pos: ``(position, treedef, node leaf indices, refs, plain indices)``
      of TREE positions.
    roots: weak refs to the unique root nodes, in order.
    live: per state leaf, its live Variable (None for raw arrays).
    raw: per state leaf, its RawSlot (None for Variables); None if no raw leaf.
    mask: per state leaf, whether it is donated.
    paths: path of every state leaf (root index first), for messages.
    reusable: False when a raw leaf cannot be written in place (re-plan
      every call); such a plan keeps its Extraction in ``ex``.
    simple: nodes are exactly the first ``prefix`` positional arguments and
      nothing else is special: arguments pass through with no rebuilding.
    jitted, cell: the compiled step and its trace-time facts.
    compile_key: what `jitted` was compiled for (to build a variant of it).
    sharded_ctx: the sharding context in force (None: no shardings derived).
    root_names: per root, where it was passed (for messages).
  """

  __slots__ = ("ex_check", "epoch", "ctx", "nargs", "kw_names", "node_checks", "plain_pos", "tree_pos",
               "kinds", "roots", "live", "live_d", "live_k", "raw", "mask", "paths",
               "reusable", "ex", "simple", "prefix", "nones", "jitted", "cell",
               "compile_key", "sharded_ctx", "root_names")


def classify(args: tuple, kwargs: dict, static: frozenset, static_names: tuple) -> tuple:
  """Kinds of all argument positions and the unique root nodes, in order.

  Returns:
    ``(values, kinds, details, roots)``: the argument values (positional then
    keyword), their kinds, per position its NodeSlot (NODE), its
    ``(treedef, leaves)`` with NodeSlots (TREE) or None, and the roots.

  >>> import jax.numpy as jnp
  >>> from spmdnnx._module import Module
  >>> m = Module()
  >>> _, kinds, _, roots = classify((m, jnp.ones(2), [m, 3]), {"n": 4}, frozenset(), ("n",))
  >>> kinds, roots == (m,)
  (['node', 'plain', 'tree', 'static'], True)
  """
  values = list(args) + list(kwargs.values())
  names = [None] * len(args) + list(kwargs)
  roots: list = []
  seen: dict[int, int] = {}

  def slot(node):
    i = seen.get(id(node))
    if i is None:
      i = seen[id(node)] = len(roots)
      roots.append(node)
    return lift.NodeSlot(i)

  kinds, details = [], []
  for i, (value, name) in enumerate(zip(values, names)):
    if (name is None and i in static) or (name is not None and name in static_names):
      kinds.append(STATIC)
      details.append(None)
    elif isinstance(value, NODE_TYPES):
      kinds.append(NODE)
      details.append(slot(value))
    elif type(value) in LEAF_TYPES or not has_nested_nodes(value):
      kinds.append(PLAIN)
      details.append(None)
    elif isinstance(value, (List, Dict)):   # a graph node in Flax: kept with its identity
      kinds.append(NODE)
      details.append(slot(value))
    else:
      leaves, treedef = jax.tree_util.tree_flatten(value, is_leaf=graph.is_graph_node)
      kinds.append(TREE)
      details.append((treedef, [slot(x) if isinstance(x, NODE_TYPES) else x for x in leaves]))
  return values, kinds, details, tuple(roots)


def state_shardings(ex: lift.Extraction, raw: list | None, ctx) -> tuple | None:
  """NamedShardings of the state leaves from metadata + rules + mesh (or None).

  Values not yet in their sharding are moved there (once, when the plan is
  made), so the state stays sharded across steps.
  """
  if ctx is None or not isinstance(ctx.mesh, Mesh):
    return None
  paths = [p[1:] for p in ex.paths]
  shardings = tuple(resolve_lib.leaf_shardings(paths, ex.leaves, ctx.mesh, ctx.rules))
  for i, (var, sharding) in enumerate(zip(ex.live, shardings)):
    value = var.raw_value if var is not None else raw[i].get()
    if isinstance(value, (jax.Array, np.ndarray)) and getattr(value, "sharding", None) != sharding:
      value = jax.device_put(value, sharding)
      if var is not None:
        _RAW_SET(var, value)
      else:
        raw[i].set(value)
  return shardings


def is_nested(ex: lift.Extraction, values: list, kinds: list) -> bool:
  """Whether the call happens inside another transform (tracers in the inputs)."""
  if any(isinstance(raw(v), jax.core.Tracer) for v in ex.leaves):
    return True
  plain = [v for v, k in zip(values, kinds) if k in (PLAIN, TREE)]
  return any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves(plain))


def constrain_leaves(leaves: list, shardings) -> list:
  """Inside the trace: pins each array leaf to its sharding (no copy)."""
  out = []
  for x, s in zip(leaves, shardings):
    value = raw(x)
    if isinstance(value, jax.Array):
      value = jax.lax.with_sharding_constraint(value, s)
    out.append(value)
  return out


def constrain_new_nodes(out: Any, ctx) -> Any:
  """Inside the trace: lays out graph objects created in the function by their axes."""

  def place(marker):
    if not isinstance(marker, lift.NodeOut):
      return marker
    state = marker.state
    if isinstance(state, Variable):
      pairs = [((), state)]
    else:
      pairs = list(state.flat_state())
    paths = [p for p, _ in pairs]
    leaves = [v for _, v in pairs]
    shardings = resolve_lib.leaf_shardings(paths, leaves, ctx.mesh, ctx.rules)
    values = constrain_leaves(leaves, shardings)
    new = [(p, v.replace(x) if isinstance(v, Variable) else x)
           for (p, v), x in zip(pairs, values)]
    if isinstance(state, Variable):
      return lift.NodeOut(marker.graphdef, new[0][1])
    return lift.NodeOut(marker.graphdef, State.from_flat_path(new))

  return jax.tree.map(place, out, is_leaf=_is_marker)


def _same_layout(actual: Any, target: NamedSharding) -> bool:
  return (isinstance(actual, NamedSharding) and actual.mesh == target.mesh
          and tuple(actual.spec) == tuple(target.spec))


def place_new_nodes(out: Any, ctx) -> Any:
  """Outside: gives new graph objects' arrays the rules' exact NamedShardings.

  They already sit in that layout (pinned in the trace); XLA only reports an
  equivalent spec (``P('fsdp')`` for ``P('fsdp', None)``). Relabelling an
  array to an equivalent sharding shares its buffers (no copy).
  """

  def place(marker):
    if not isinstance(marker, lift.NodeOut):
      return marker
    state = marker.state
    pairs = [((), state)] if isinstance(state, Variable) else list(state.flat_state())
    shardings = resolve_lib.leaf_shardings([p for p, _ in pairs], [v for _, v in pairs],
                                           ctx.mesh, ctx.rules)
    for (_, var), sharding in zip(pairs, shardings):
      value = raw(var)
      if isinstance(value, jax.Array) and not _same_layout(value.sharding, sharding):
        value = jax.device_put(value, sharding)
        if isinstance(var, Variable):
          _RAW_SET(var, value)
    return marker

  return jax.tree.map(place, out, is_leaf=_is_marker)


def variable_nodes(graphdef: graph.GraphDef) -> list:
  """Per state leaf of `graphdef` (DFS order): its Variable's node index, None for an array.

  >>> import jax.numpy as jnp, spmdnnx as nnx
  >>> m = nnx.Dict(a=nnx.Param(jnp.ones(1)), b=jnp.zeros(1))
  >>> variable_nodes(nnx.graphdef(m))
  [1, None]
  """
  out: list = []

  def visit(spec):
    kind = type(spec)
    if kind is VariableSpec:
      out.append(spec.index)
    elif kind is ArraySpec:
      out.append(None)
    elif kind in (NodeSpec, PytreeSpec):
      for child in spec.children:
        visit(child[1] if kind is NodeSpec else child)

  visit(graphdef.spec)
  return out


def only_moved(restructure: "lift.Restructure | None", graphdef: graph.GraphDef) -> bool:
  """Whether a structure change only moved objects/Variables (same GraphDef, no raw array)."""
  return (restructure is not None and restructure.graphdef == graphdef
          and None not in variable_nodes(graphdef))


def write_moved(all_nodes: list, new_leaves: list, restructure: lift.Restructure) -> None:
  """No graph updates: each Variable that moved inside gets its own new value back.

  `all_nodes` are the outer nodes by GraphDef index (`Extraction.all_nodes`).
  """
  for node, value in zip(variable_nodes(restructure.graphdef), new_leaves):
    old = restructure.reuse.get(node, -1)
    if old >= 0:
      _RAW_SET(all_nodes[old], raw(value))


def fill_static_roots(restructure: lift.Restructure, roots: tuple) -> None:
  """A List/Dict root left holding no data inside (``d.a = 2``) gets its new items.

  Such a container is static in the new GraphDef, so rebuilding does not
  reach the caller's object: its items (plain Python values) are copied in.
  """
  spec = restructure.graphdef.spec
  if type(spec) is StaticSpec:   # no root holds data any more: the whole tuple is static
    news = list(enumerate(spec.value.value))
  elif type(spec) is NodeSpec:
    news = [(k, c.value.value) for k, c in spec.children if type(c) is StaticSpec]
  else:
    return
  for key, new in news:
    root = roots[key]
    if isinstance(root, (List, Dict)) and isinstance(new, (list, dict)) and new is not root:
      if isinstance(root, List):
        list.__setitem__(root, slice(None), list(new))
      else:
        dict.clear(root)
        dict.update(root, new)
      root._changed()


def make_inner(fun: Callable, graphdef, layout: tuple, kw_names: tuple, mask: tuple,
               n_roots: int, shardings: tuple | None, ctx, cell: Cell,
               constrain_state: bool) -> Callable:
  """The function `jax.jit` compiles for one plan layout.

  Its arguments are ``(vals_d, vals_k, *positions)``: the donated and kept
  state values, then one value per argument position (positional, then
  keyword in `kw_names` order): None for NODE, the plain leaves for TREE, the
  value itself otherwise. It rebuilds the graph objects, calls `fun`, and
  returns the new state values and the output. Under a sharding context
  (`ctx`), graph objects created inside are pinned to the rules' shardings in
  the trace, so they come out laid out (no extra copy); so is the state when
  `constrain_state` (the variant used when the function changed the graph's
  structure, so that `jax.jit`'s out_shardings cannot name the new leaves).
  """
  name = f"jit({lift.fun_name(fun)})"
  root_slots = [lift.NodeSlot(j) for j in range(n_roots)]
  roots_treedef = jax.tree_util.tree_structure(tuple(range(n_roots)))
  nkw = len(kw_names)

  def call_with(roots_t, positions):
    full = []
    for (kind, detail), value in zip(layout, positions):
      if kind == NODE:
        full.append(roots_t[detail])
      elif kind == TREE:
        treedef, slots, plain_idx = detail
        leaves = [None] * treedef.num_leaves
        for k, v in zip(plain_idx, value):
          leaves[k] = v
        for k, r in slots:
          leaves[k] = roots_t[r]
        full.append(jax.tree_util.tree_unflatten(treedef, leaves))
      else:
        full.append(value)
    if nkw:
      return fun(*full[:-nkw], **dict(zip(kw_names, full[-nkw:])))
    return fun(*full)

  def inner(vals_d, vals_k, *positions):
    it_d, it_k = iter(vals_d), iter(vals_k)
    vals = [next(it_d) if m else next(it_k) for m in mask]
    new_leaves, restructure, out, has_nodes = lift.run_inside(
        graphdef, roots_treedef, vals, root_slots,
        lambda roots_t: call_with(roots_t, positions), name, identity=True)
    cell.has_nodes = cell.has_nodes or has_nodes
    cell.restructure = restructure
    out = mark_refs(out, positions, cell)
    if ctx is None:
      return [raw(x) for x in new_leaves], out
    if has_nodes:
      out = constrain_new_nodes(out, ctx)
    if not constrain_state:
      return [raw(x) for x in new_leaves], out
    if restructure is None:
      leaf_sh = shardings
    else:
      leaf_sh = resolve_lib.leaf_shardings([p[1:] for p in restructure.paths], new_leaves,
                                           ctx.mesh, ctx.rules)
    return constrain_leaves(new_leaves, leaf_sh), out

  return inner
