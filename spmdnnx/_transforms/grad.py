"""`grad` and `value_and_grad` over graph objects.

An argument to differentiate may be a graph node (a Module, say), a Variable,
an ``nnx.List`` / ``nnx.Dict``, or any pytree holding those and arrays. Its
gradient has the argument's pytree structure, each graph object replaced by:

- graph mode with updates (the default): a `State` of the object's Variables
  selected by a filter (`Param` by default; per argument with
  ``DiffState(argnum, filter)``, for all with ``wrt=``); a Variable passed
  directly gets a Variable of its type holding its gradient;
- ``graph_updates=False`` or tree mode: an object of the argument's type
  whose Variables hold the gradients (all inexact Variables differentiated,
  or those matching an explicit ``wrt``; the others hold zeros).

An object or Variable reachable from several places is differentiated once,
where it is first reached (arguments in order, depth first): later places get
an empty `State` (graph mode with updates). Plain arrays (whole arguments, or
leaves of a pytree argument) get plain gradients. Mutations made inside
(BatchNorm statistics, Rngs counters) propagate to the originals.

>>> import jax.numpy as jnp
>>> from spmdnnx._module import Module
>>> from spmdnnx._variables import Param
>>> class Lin(Module):
...   def __init__(self):
...     self.w = Param(jnp.array([2.0]))
>>> g = grad(lambda m, x: (m.w.value * x).sum())(Lin(), jnp.array([3.0]))
>>> g["w"].value
Array([3.], dtype=float32)
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax

from spmdnnx import errors
from spmdnnx import _filters as filterlib
from spmdnnx import _graph as graph
from spmdnnx._object import Dict, List
from spmdnnx._state import State
from spmdnnx._transforms import guards
from spmdnnx._transforms import jit_plan as plan_lib
from spmdnnx._transforms import lift
from spmdnnx._variables import Param, Variable, detach


@dataclasses.dataclass(frozen=True)
class DiffState(guards.PrefixMap):
  """Differentiate argument `argnum` with respect to Variables matching `filter`.

  Only in graph mode with updates (elsewhere every inexact Variable is
  differentiated and a DiffState in ``argnums`` is an error).

  >>> import jax.numpy as jnp, spmdnnx as nnx
  >>> m = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
  >>> g = nnx.grad(lambda m: m(jnp.ones((1, 2))).sum(),
  ...              argnums=nnx.DiffState(0, nnx.PathContains("bias")))(m)
  >>> sorted(k for k, _ in g.items())
  ['bias']
  """
  argnum: int
  filter: Any = Param


def _normalize_argnums(argnums, wrt) -> tuple[tuple[DiffState, ...], bool]:
  single = isinstance(argnums, (int, DiffState))
  items = (argnums,) if single else tuple(argnums)
  out = []
  for a in items:
    if isinstance(a, DiffState):
      out.append(a)
    elif isinstance(a, int) and not isinstance(a, bool):
      out.append(DiffState(a, wrt))
    else:
      raise errors.TransformError(
          f"grad: argnums entries must be ints or DiffState, got {a!r}.")
  seen = [d.argnum for d in out]
  repeated = sorted({n for n in seen if seen.count(n) > 1})
  if repeated:
    raise errors.TransformError(
        f"grad: argnum {repeated[0]} is repeated in argnums ({argnums!r}); give each "
        "argument once (a DiffState's filter can select several Variable types: "
        "nnx.Any(A, B)).", positions=repeated)
  return tuple(out), single


def _is_unit(x: Any) -> bool:
  """A graph object whose gradient is one State / object: nnx.List and nnx.Dict too."""
  return graph.is_graph_node(x) or isinstance(x, (List, Dict))


@dataclasses.dataclass
class _Unit:
  """One leaf of an argument flattened down to graph objects (`_is_unit`)."""
  kind: str            # "object", "variable", "container" or "plain"
  value: Any
  keypath: tuple       # within the argument
  entries: list        # (path in the unit, root index, first reached) per graph root
  pos: int = -1        # "plain": the leaf's position in Extraction.arg_leaves


def _layout(args: tuple, ex: lift.Extraction) -> list[tuple[Any, list[_Unit]]]:
  """Per argument: its treedef down to units and the units.

  Walks the arguments in the order `lift.extract` flattened them, so that
  every graph root is marked first reached at exactly one place.
  """
  pos = 0
  seen: set = set()
  out = []

  def root_at(path):
    nonlocal pos
    slot = ex.arg_leaves[pos]
    pos += 1
    if not isinstance(slot, lift.NodeSlot):
      return None
    first = slot.index not in seen
    seen.add(slot.index)
    return (path, slot.index, first)

  for arg in args:
    keyed, treedef = jax.tree_util.tree_flatten_with_path(arg, is_leaf=_is_unit)
    units = []
    for keypath, value in keyed:
      keys = tuple(graph._key_name(k) for k in keypath)
      if isinstance(value, (List, Dict)):
        entries = []
        for sub, _ in jax.tree_util.tree_flatten_with_path(
            value, is_leaf=graph.is_graph_node)[0]:
          entry = root_at(tuple(graph._key_name(k) for k in sub))
          if entry is not None:
            entries.append(entry)
        units.append(_Unit("container", value, keys, entries))
      elif graph.is_graph_node(value):
        kind = "variable" if isinstance(value, Variable) else "object"
        units.append(_Unit(kind, value, keys, [root_at(())]))
      else:
        units.append(_Unit("plain", value, keys, [], pos))
        pos += 1
    out.append((treedef, units))
  return out


@dataclasses.dataclass
class _Selection:
  """What one argnums entry differentiates."""
  whole: bool                                  # a plain argument: differentiated as is
  state: list = dataclasses.field(default_factory=list)   # Extraction leaf indices
  plain: list = dataclasses.field(default_factory=list)   # arg_leaves positions


def _inexact(leaf: Any) -> bool:
  value = lift._raw(leaf)
  try:
    return jax.numpy.issubdtype(jax.numpy.result_type(value), jax.numpy.inexact)
  except TypeError:
    return False


def _select(d: DiffState, arg: Any, units: list[_Unit], ex: lift.Extraction,
            root_leaves: dict, updates: bool, allow_int: bool) -> _Selection:
  """The state leaves and plain leaves argnums entry `d` differentiates."""
  if all(u.kind == "plain" for u in units):
    return _Selection(True)
  sel = _Selection(False)
  in_state = isinstance(arg, State)
  pred = None if d.filter is None else filterlib.to_predicate(d.filter)

  def numeric(leaf):
    return allow_int or _inexact(leaf)

  for u in units:
    if u.kind == "plain":
      if not in_state or numeric(u.value):
        sel.plain.append(u.pos)
      continue
    for path, r, first in u.entries:
      if not first:
        continue
      for i in root_leaves.get(r, ()):
        leaf = ex.leaves[i]
        if u.kind == "variable":
          ok = numeric(leaf) if (in_state or not updates) else True
        elif updates:
          ok = pred(path + ex.paths[i][1:], leaf)
        else:
          ok = numeric(leaf) and (pred is None or pred(path + ex.paths[i][1:], leaf))
        if ok:
          sel.state.append(i)
  return sel


def _state_grads(units: list[_Unit], ex: lift.Extraction, root_leaves: dict, gmap: dict,
                 pmap: dict, treedef: Any, arg: Any) -> Any:
  """Graph mode with updates: States (Variables for Variables) in the argument's shape."""
  out = []
  for u in units:
    if u.kind == "plain":
      out.append(pmap.get(u.pos, _MISSING))
      continue
    pairs = [(path + ex.paths[i][1:], gmap[i]) for path, r, first in u.entries if first
             for i in root_leaves.get(r, ()) if i in gmap]
    if u.kind == "variable":
      out.append(pairs[0][1] if pairs else _MISSING if isinstance(arg, State) else State({}))
    else:
      out.append(State.from_flat_path(pairs))
  if isinstance(arg, State):
    keyed = [(u.keypath, g) for u, g in zip(units, out) if g is not _MISSING]
    return State.from_flat_path(keyed)
  return jax.tree_util.tree_unflatten(treedef, out)


def _object_grads(units: list[_Unit], ex: lift.Extraction, gmap: dict, pmap: dict,
                  treedef: Any) -> Any:
  """No updates / tree mode: objects of the argument's types holding the gradients.

  Variables are matched by identity (a shared one holds its gradient
  everywhere); what was not differentiated holds zeros.
  """
  by_var = {id(ex.live[i]): g for i, g in gmap.items() if ex.live[i] is not None}
  raw_by_id = {id(ex.leaves[i]): g for i, g in gmap.items() if ex.live[i] is None}

  def leaf_grad(live):
    if isinstance(live, Variable):
      g = by_var.get(id(live))
      return g if g is not None else detach(live, _zeros(live.raw_value))
    g = raw_by_id.get(id(live))   # a raw array attribute (nnx.data)
    return g if g is not None else _zeros(live)

  out = []
  for u in units:
    if u.kind == "plain":
      out.append(pmap.get(u.pos, _zeros(u.value)))
    elif u.kind == "variable":
      out.append(leaf_grad(u.value))
    else:
      gd, w = graph.flatten(u.value, detach_variables=False)
      out.append(graph.merge(gd, State.from_flat_path([(p, leaf_grad(v)) for p, v in w.pairs])))
  return jax.tree_util.tree_unflatten(treedef, out)


_MISSING = object()


def _zeros(value: Any) -> Any:
  return jax.numpy.zeros_like(value)


def _grad_transform(f: Callable, argnums, has_aux: bool, wrt, return_value: bool,
                    holomorphic: bool = False, allow_int: bool = False,
                    graph_mode: bool = True, graph_updates: bool = True) -> Callable:
  who = "value_and_grad" if return_value else "grad"
  guards.check_unbound(f, who)
  updates = graph_mode and graph_updates
  guards.check_prefix(argnums, "argnums", who, graph_mode, updates)
  if wrt is None and updates:
    wrt = Param
  diffs, single = _normalize_argnums(argnums, wrt)
  name = lift.fun_name(f)

  @functools.wraps(f)
  def wrapper(*args):
    for d in diffs:
      if not -len(args) <= d.argnum < len(args):
        raise errors.TransformError(
            f"grad({name}): argnum {d.argnum} is out of range for "
            f"{len(args)} positional argument(s).")
    argnums_ = [d.argnum % len(args) for d in diffs]
    if graph_mode and not updates and len(args) > 1:
      _check_diff_aliasing(args, set(argnums_), name)
    ex = lift.extract(tuple(args), aliasing=graph_mode, who=who)
    layout = _layout(args, ex)
    root_leaves: dict = {}
    for i, p in enumerate(ex.paths):
      root_leaves.setdefault(p[0], []).append(i)
    selections = [_select(d, args[n], layout[n][1], ex, root_leaves, updates, allow_int)
                  for d, n in zip(diffs, argnums_)]
    whole = {n: k for k, (n, s) in enumerate(zip(argnums_, selections)) if s.whole}
    cell: dict = {}

    def inner(*diff_inputs):
      leaves = list(ex.leaves)
      arg_leaves = list(ex.arg_leaves)
      for sel, inp in zip(selections, diff_inputs):
        if not sel.whole:
          for i, x in zip(sel.state, inp[0]):
            leaves[i] = x
          for j, x in zip(sel.plain, inp[1]):
            arg_leaves[j] = x

      def call(call_args):
        call_args = list(call_args)
        for n, k in whole.items():
          call_args[n] = diff_inputs[k]
        out = f(*call_args)
        if not has_aux:
          return out, None
        if not (isinstance(out, tuple) and len(out) == 2):
          raise errors.TransformError(
              f"grad({name}, has_aux=True): the function must return a "
              f"(loss, aux) pair, got {_describe(out)}.")
        return out

      new_leaves, restructure, (loss, aux), has_nodes = lift.run_inside(
          ex.graphdef, ex.treedef, leaves, arg_leaves, call, f"grad({name})", identity=True)
      cell["restructure"], cell["has_nodes"] = restructure, has_nodes
      return loss, (aux, new_leaves)

    diff_inputs = [args[n] if s.whole else
                   ([ex.leaves[i] for i in s.state], [ex.arg_leaves[j] for j in s.plain])
                   for n, s in zip(argnums_, selections)]
    vg = jax.value_and_grad(inner, argnums=tuple(range(len(diffs))), has_aux=True,
                            holomorphic=holomorphic, allow_int=allow_int)
    (loss, (aux, new_leaves)), grads = vg(*diff_inputs)
    restructure = cell["restructure"]
    if not updates and plan_lib.only_moved(restructure, ex.graphdef):
      plan_lib.write_moved(ex.all_nodes, new_leaves, restructure)  # values by identity
    else:
      if not updates:
        guards.check_kept_structure(restructure, who, name)
      lift.apply_updates(ex, new_leaves, restructure)
    if cell["has_nodes"]:
      aux = lift.unmark_outputs(ex.nodes, aux)
    out_grads = []
    for n, s, g in zip(argnums_, selections, grads):
      if s.whole:
        out_grads.append(g)
        continue
      gmap, pmap = dict(zip(s.state, g[0])), dict(zip(s.plain, g[1]))
      treedef, units = layout[n]
      if updates:
        out_grads.append(_state_grads(units, ex, root_leaves, gmap, pmap, treedef, args[n]))
      else:
        out_grads.append(_object_grads(units, ex, gmap, pmap, treedef))
    grads_out = out_grads[0] if single else tuple(out_grads)
    if return_value:
      return ((loss, aux) if has_aux else loss), grads_out
    return (grads_out, aux) if has_aux else grads_out

  return wrapper


def _nodes_of(arg: Any) -> dict[int, tuple]:
  """id -> path of every object and Variable reachable from ``arg``."""
  out: dict[int, tuple] = {}
  keyed = jax.tree_util.tree_flatten_with_path(arg, is_leaf=graph.is_graph_node)[0]
  for keypath, leaf in keyed:
    if graph.is_graph_node(leaf):
      base = tuple(graph._key_name(k) for k in keypath)
      for path, value in graph.iter_graph(leaf, graph=True):
        if graph.is_graph_node(value):
          out.setdefault(id(value), base + tuple(path))
  return out


def _check_diff_aliasing(args: tuple, diff: set, name: str) -> None:
  """graph_updates=False: an object reached from a differentiated and another argument.

  Its Variables would get a gradient through one argument and not the other,
  and without updates there is no single object to write back to.
  """
  seen: dict[int, tuple] = {}  # id -> (argnum, path) of the first occurrence
  clashes = []
  for n, arg in enumerate(args):
    for key, path in _nodes_of(arg).items():
      if key in seen and (seen[key][0] in diff) != (n in diff):
        first = seen[key]
        clashes.append(f"argument {first[0]} at {errors.path_str(first[1]) or '<root>'} "
                       f"and argument {n} at {errors.path_str(path) or '<root>'}")
      seen.setdefault(key, (n, path))
  if clashes:
    raise errors.TransformError(
        f"grad({name}) with graph_updates=False: Inconsistent aliasing detected: the same "
        f"object or Variable is reached from a differentiated and a non-differentiated "
        f"argument ({errors.format_paths(clashes)}). Pass it once, pass a copy "
        f"(nnx.clone), or use graph updates: nnx.grad(..., graph_updates=True).")


def _describe(out) -> str:
  if isinstance(out, jax.core.Tracer) or hasattr(out, "shape"):
    return f"a single array of shape {tuple(getattr(out, 'shape', ()))}"
  if isinstance(out, tuple):
    return f"a tuple of length {len(out)}"
  return f"a {type(out).__name__}"


def grad(f: Callable | None = None, argnums: int | DiffState | Sequence = 0,
         has_aux: bool = False, *, wrt: Any = None, holomorphic: bool = False,
         allow_int: bool = False, reduce_axes: tuple = (), graph: bool | None = None,
         graph_updates: bool | None = None) -> Callable:
  """Gradient of `f` with respect to argument(s) `argnums` (shapes: module doc).

  Args:
    argnums: an int, a `DiffState`, or a sequence of them.
    wrt: the filter of the Variables differentiated in graph objects (default
      `Param` with graph updates; without, every inexact Variable).
    allow_int: as `jax.grad` (integer leaves get float0 gradients); without
      it, integer Variables of a `State` argument are left out of its gradient.
    graph / graph_updates: as `jit` (tree mode refuses a Variable reachable
      twice; without updates a structure change inside is an error).

  Raises:
    TransformError: `f` is a bound method; argnums out of range, repeated, or
      not ints/DiffStates; a DiffState or graph object used as an argnums
      prefix where the mode forbids it; the mode's rules broken.

  >>> import jax.numpy as jnp, spmdnnx as nnx
  >>> p = nnx.Param(jnp.array(3.0))
  >>> g = nnx.grad(lambda d: d["w"][...] ** 2)({"w": p})
  >>> type(g["w"]).__name__, float(g["w"][...])
  ('Param', 6.0)
  """
  del reduce_axes
  graph, graph_updates = guards.resolve_modes(graph, graph_updates)
  if f is None:
    return lambda fn: grad(fn, argnums, has_aux, wrt=wrt, holomorphic=holomorphic,
                           allow_int=allow_int, graph=graph, graph_updates=graph_updates)
  return _grad_transform(f, argnums, has_aux, wrt, False, holomorphic, allow_int,
                         graph, graph_updates)


def value_and_grad(f: Callable | None = None, argnums: int | DiffState | Sequence = 0,
                   has_aux: bool = False, *, wrt: Any = None, holomorphic: bool = False,
                   allow_int: bool = False, reduce_axes: tuple = (),
                   graph: bool | None = None, graph_updates: bool | None = None) -> Callable:
  """Like `grad`, returning ``(value, grads)`` (value is ``(loss, aux)`` with has_aux)."""
  del reduce_axes
  graph, graph_updates = guards.resolve_modes(graph, graph_updates)
  if f is None:
    return lambda fn: value_and_grad(fn, argnums, has_aux, wrt=wrt, holomorphic=holomorphic,
                                     allow_int=allow_int, graph=graph,
                                     graph_updates=graph_updates)
  return _grad_transform(f, argnums, has_aux, wrt, True, holomorphic, allow_int,
                         graph, graph_updates)
