"""`grad` and `value_and_grad` over graph objects.

For an argument that is a graph node (a Module, say), the gradient is a
State of the node's Variables selected by a filter (`Param` by default; pick
another per argument with ``DiffState(argnum, filter)`` or for all with
``wrt=``). Plain array arguments get plain gradients. Mutations made inside
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
from spmdnnx._state import State
from spmdnnx._transforms import axes as axeslib
from spmdnnx._transforms import guards
from spmdnnx._transforms import lift
from spmdnnx._variables import Param, Variable, detach


@dataclasses.dataclass(frozen=True)
class DiffState:
  """Differentiate argument `argnum` with respect to Variables matching `filter`."""
  argnum: int
  filter: Any = Param


def _normalize_argnums(argnums, wrt) -> tuple[tuple[DiffState, ...], bool]:
  single = isinstance(argnums, (int, DiffState))
  items = (argnums,) if single else tuple(argnums)
  out = []
  for a in items:
    if isinstance(a, DiffState):
      out.append(a)
    elif isinstance(a, int):
      out.append(DiffState(a, wrt))
    else:
      raise errors.TransformError(
          f"grad: argnums entries must be ints or DiffState, got {a!r}.")
  return tuple(out), single


def _grad_transform(f: Callable, argnums, has_aux: bool, wrt, return_value: bool,
                    holomorphic: bool = False, allow_int: bool = False,
                    graph_mode: bool = True, graph_updates: bool = True) -> Callable:
  who = "value_and_grad" if return_value else "grad"
  guards.check_unbound(f, who)
  diffs, single = _normalize_argnums(argnums, wrt)
  updates = graph_mode and graph_updates

  name = lift.fun_name(f)

  @functools.wraps(f)
  def wrapper(*args):
    for d in diffs:
      if d.argnum >= len(args):
        raise errors.TransformError(
            f"grad({name}): argnum {d.argnum} is out of range for "
            f"{len(args)} positional argument(s).")
    ex = lift.extract(tuple(args), aliasing=graph_mode, who=who)
    node_arg = axeslib.node_arg_index(args)
    selections = []  # per diff entry: ("node", leaf indices) or ("plain", None)
    for d in diffs:
      arg = args[d.argnum]
      if graph.is_graph_node(arg):
        pred = filterlib.to_predicate(d.filter)
        idx = [i for i, p in enumerate(ex.paths)
               if node_arg[p[0]] == d.argnum and pred(p[1:], ex.leaves[i])]
        selections.append(("node", idx))
      else:
        inner_nodes = [x for x in jax.tree_util.tree_leaves(arg, is_leaf=graph.is_graph_node)
                       if graph.is_graph_node(x)]
        if inner_nodes and all(isinstance(x, Variable) for x in inner_nodes):
          # A State (or pytree) of Variables: differentiate every inexact one.
          idx = [i for i, p in enumerate(ex.paths) if node_arg[p[0]] == d.argnum
                 and _inexact(ex.leaves[i])]
          selections.append(("vars", idx))
          continue
        if inner_nodes:
          raise errors.TransformError(
              f"grad({name}): argument {d.argnum} is a {type(arg).__name__} "
              "holding graph objects; differentiate with respect to each Module "
              "by passing it as its own positional argument.")
        selections.append(("plain", None))

    slot_pos = {}
    for k, d in enumerate(diffs):
      if selections[k][0] == "plain":
        slot_pos[d.argnum] = k

    cell: dict = {}

    def inner(*diff_inputs):
      leaves = list(ex.leaves)
      for (kind, idx), inp in zip(selections, diff_inputs):
        if kind in ("node", "vars"):
          for i, leaf in zip(idx, inp):
            leaves[i] = leaf

      def call(call_args):
        call_args = list(call_args)
        for argnum, k in slot_pos.items():
          call_args[argnum] = diff_inputs[k]
        out = f(*call_args)
        if not has_aux:
          return out, None
        if not (isinstance(out, tuple) and len(out) == 2):
          raise errors.TransformError(
              f"grad({name}, has_aux=True): the function must return a "
              f"(loss, aux) pair, got {_describe(out)}.")
        return out

      new_leaves, restructure, (loss, aux), has_nodes = lift.run_inside(
          ex.graphdef, ex.treedef, leaves, list(ex.arg_leaves), call, f"grad({name})")
      cell["restructure"], cell["has_nodes"] = restructure, has_nodes
      return loss, (aux, new_leaves)

    diff_inputs = []
    for (kind, idx), d in zip(selections, diffs):
      diff_inputs.append([ex.leaves[i] for i in idx] if kind != "plain" else args[d.argnum])
    vg = jax.value_and_grad(inner, argnums=tuple(range(len(diffs))), has_aux=True,
                            holomorphic=holomorphic, allow_int=allow_int)
    (loss, (aux, new_leaves)), grads = vg(*diff_inputs)
    if not updates:
      guards.check_kept_structure(cell["restructure"], who, name)
    lift.apply_updates(ex, new_leaves, cell["restructure"])
    if cell["has_nodes"]:
      aux = lift.unmark_outputs(ex.nodes, aux)
    out_grads = []
    for (kind, idx), g, d in zip(selections, grads, diffs):
      if kind == "node" and not updates:
        out_grads.append(_as_object(args[d.argnum], ex, dict(zip(idx, g))))
      elif kind == "node":
        out_grads.append(State.from_flat_path(
            [(ex.paths[i][1:], gi) for i, gi in zip(idx, g)]))
      elif kind == "vars":
        out_grads.append(_vars_grads(args[d.argnum], ex, idx, g))
      else:
        out_grads.append(g)
    grads_out = out_grads[0] if single else tuple(out_grads)
    if return_value:
      return ((loss, aux) if has_aux else loss), grads_out
    return (grads_out, aux) if has_aux else grads_out

  return wrapper


def _inexact(leaf: Any) -> bool:
  value = lift._raw(leaf)
  return hasattr(value, "dtype") and jax.numpy.issubdtype(value.dtype, jax.numpy.inexact)


def _vars_grads(arg: Any, ex: lift.Extraction, idx: list, g: list) -> Any:
  """The gradient of a pytree of Variables: same structure, Variables of the same types.

  Variables not differentiated (integer ones) are left out of a State.
  """
  by_var = {id(ex.live[i]): gi for i, gi in zip(idx, g)}
  if isinstance(arg, State):
    pairs = [(path, detach(v, by_var[id(v)])) for path, v in arg.flat_state()
             if isinstance(v, Variable) and id(v) in by_var]
    return State.from_flat_path(pairs)
  return jax.tree_util.tree_map(
      lambda v: detach(v, by_var[id(v)]) if isinstance(v, Variable) and id(v) in by_var
      else v, arg, is_leaf=graph.is_graph_node)


def _as_object(node: Any, ex: lift.Extraction, grads: dict) -> Any:
  """Tree mode / no updates: the gradient as an object of the argument's type.

  Its Variables hold the gradients (zeros for the Variables not differentiated).
  """
  graphdef, _ = graph.split(node)
  root = next(i for i, n in enumerate(ex.nodes) if n is node)
  pairs = []
  for i, (path, leaf) in enumerate(zip(ex.paths, ex.leaves)):
    if path[0] == root:
      value = grads[i] if i in grads else jax.numpy.zeros_like(lift._raw(leaf))
      pairs.append((path[1:], value))
  return graph.merge(graphdef, State.from_flat_path(pairs))


def _describe(out) -> str:
  if isinstance(out, jax.core.Tracer) or hasattr(out, "shape"):
    return f"a single array of shape {tuple(getattr(out, 'shape', ()))}"
  if isinstance(out, tuple):
    return f"a tuple of length {len(out)}"
  return f"a {type(out).__name__}"


def grad(f: Callable | None = None, argnums: int | DiffState | Sequence = 0,
         has_aux: bool = False, *, wrt: Any = Param, holomorphic: bool = False,
         allow_int: bool = False, reduce_axes: tuple = (), graph: bool | None = None,
         graph_updates: bool | None = None) -> Callable:
  """Gradient of `f` with respect to argument(s) `argnums`.

  Graph-node arguments get a State of the Variables matching `wrt` (or the
  DiffState's filter); other arguments get plain gradients.

  Args:
    graph / graph_updates: as `jit` (tree mode refuses a Variable reachable
      twice; without updates a structure change inside is an error).

  Raises:
    TransformError: `f` is a bound method; argnums out of range; a pytree
      argument to differentiate holds graph objects; the mode's rules broken.
  """
  del reduce_axes
  graph, graph_updates = guards.resolve_modes(graph, graph_updates)
  if f is None:
    return lambda fn: grad(fn, argnums, has_aux, wrt=wrt, holomorphic=holomorphic,
                           allow_int=allow_int, graph=graph, graph_updates=graph_updates)
  return _grad_transform(f, argnums, has_aux, wrt, False, holomorphic, allow_int,
                         graph, graph_updates)


def value_and_grad(f: Callable | None = None, argnums: int | DiffState | Sequence = 0,
                   has_aux: bool = False, *, wrt: Any = Param, holomorphic: bool = False,
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
